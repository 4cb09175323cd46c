"""Entry point: python main.py --config=configs/cocohd_oproj_fc2.py[:runlocal] --workdir=DIR"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file of one ablation arm.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and the adapter go (or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def check_schema(config) -> None:
    """An arm file may only set keys that configs/base.py defines."""
    from configs import base

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("rank_overrides", "alpha_overrides"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    unknown = sorted(set(keys(config.to_dict())) - set(keys(base.get_config().to_dict())))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)} (see configs/base.py)")


def initialize_distributed(jax) -> None:
    """Multi-process JAX: explicit (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, e.g.
    several processes on one host) or auto-detected (multi-host TPU VMs, SLURM, Open MPI)."""
    num = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if num > 1:
        # Cross-process collectives on the CPU backend (harmless where accelerators do the work).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num,
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or "SLURM_NTASKS" in os.environ:
        jax.distributed.initialize()


def main(argv):
    del argv
    import jax

    initialize_distributed(jax)
    config = _CONFIG.value
    check_schema(config)
    logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    from lora_jax import train

    if config.mode == "train":
        train.train_and_evaluate(config, _WORKDIR.value)
    else:
        raise ValueError(f"mode={config.mode!r} is unknown; valid: train")


if __name__ == "__main__":
    app.run(main)
