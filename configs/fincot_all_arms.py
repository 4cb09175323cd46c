"""fincot: every study arm of the dataset trained jointly over one base (one job, one copy of the base).

Each arm writes its own run into <workdir>/fincot_<arm>_s<seed>/ (see lora_jax/run/train_loop.py).
"""

from configs import base
from configs.sweeps.study import STUDY_ARMS


def get_config(arg=None):
    config = base.arm_config("fincot", "all", arg)  # the arms below replace its targets
    config.arm, config.arms = "all_arms", STUDY_ARMS["fincot"]
    return config
