"""MedMCQA, LoRA on o_proj + fc2 (study arm `oproj_fc2`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("medmcqa", "oproj_fc2", arg)
