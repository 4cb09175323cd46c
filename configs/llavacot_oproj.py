"""LLaVA-CoT, LoRA on the language model's o_proj (study arm `oproj`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "oproj", arg)
