"""MedMCQA, LoRA on o_proj (study arm `oproj`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("medmcqa", "oproj", arg)
