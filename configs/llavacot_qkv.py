"""LLaVA-CoT, LoRA on the language model's qkv (study arm `qkv`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "qkv", arg)
