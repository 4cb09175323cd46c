"""LLaVA-CoT, LoRA on the language model's fc2 (study arm `fc2`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "fc2", arg)
