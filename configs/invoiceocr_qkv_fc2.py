"""Invoice OCR, LoRA on the language model's qkv + fc2 (study arm `qkv_fc2`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("invoiceocr", "qkv_fc2", arg)
