"""LLaVA-CoT, LoRA on the language model's fc1 (study arm `fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "fc1", arg)
