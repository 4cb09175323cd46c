"""FinCoT, LoRA on fc1 (study arm `fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("fincot", "fc1", arg)
