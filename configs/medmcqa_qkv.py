"""MedMCQA, LoRA on qkv (study arm `qkv`)."""

from configs import base


def get_config(arg=None):
    return base.arm_config("medmcqa", "qkv", arg)
