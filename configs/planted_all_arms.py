"""planted: every study arm trained jointly over one base, on a planted teacher's data (one job).

The teacher is the base + a low-rank delta on config.planted.targets (configs/base.py; the run writes
its data to <workdir>/joint/planted). Each arm writes its own run into <workdir>/planted_<arm>_s<seed>/.
`:runlocal` is the tiny random model (configs/sweeps/planted.py runs it as a study).
"""

from configs import base
from lora_jax.lora.arms import ARMS


def get_config(arg=None):
    config = base.arm_config("planted", "all", arg)  # the arms below replace its targets
    config.arm, config.arms = "all_arms", tuple(ARMS)
    return config
