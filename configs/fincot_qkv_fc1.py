"""FinCoT, LoRA on qkv + fc1 (study arm `qkv_fc1`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("fincot", "qkv_fc1", arg)
