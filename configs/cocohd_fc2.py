"""CoCoHD, LoRA on fc2 (study arm `fc2`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("cocohd", "fc2", arg)
