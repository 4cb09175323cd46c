"""Invoice OCR, LoRA on the language model's qkv + o_proj + fc1 + fc2 (study arm `all`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("invoiceocr", "all", arg)
