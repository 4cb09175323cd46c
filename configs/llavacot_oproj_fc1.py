"""LLaVA-CoT, LoRA on the language model's o_proj + fc1 (study arm `oproj_fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "oproj_fc1", arg)
