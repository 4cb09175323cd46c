"""LLaVA-CoT, LoRA on the language model's o_proj + fc2 (study arm `oproj_fc2`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("llavacot", "oproj_fc2", arg)
