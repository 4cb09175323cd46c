"""LLaVA-CoT, LoRA on the language model's qkv + fc1 (study arm `qkv_fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "qkv_fc1", arg)
