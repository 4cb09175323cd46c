"""FinCoT, LoRA on o_proj + fc1 (study arm `oproj_fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("fincot", "oproj_fc1", arg)
