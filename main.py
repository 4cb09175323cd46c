"""Entry point: python main.py --config=configs/cocohd_oproj_fc2.py[:runlocal] [--workdir=DIR] [--verbose]

A mistake in what the user gave (config, data, checkpoint, workdir) is one line on stderr naming the
key, file or value and what was expected, and exit status 2; a traceback means a bug (or --verbose).
"""

import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file of one ablation arm.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, TensorBoard events and the adapter (or gs://). Default: workdir/<config name>."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Library logs at INFO, and tracebacks for user errors too.")

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _flag_error_line(error: Exception) -> str:
    """absl/ml_collections flag errors, some carrying a whole traceback, as the one line that matters."""
    text = str(error)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        flag = text.split(":", 1)[0]
        return f"{flag}: {last.strip()}"
    if isinstance(error, flags.UnrecognizedFlagError) and "config." in text:
        return f"{text} (configs/base.py lists every config key)"
    return text.splitlines()[0] if text else type(error).__name__


def _unknown_key_line(text: str, argv: list[str]) -> str:
    key = re.search(r"'(\w+)", text)
    given = [a.split("=")[0] for a in argv[1:] if key and a.startswith("--config.") and key.group(1) in a]
    where = given[0] if given else (key.group(1) if key else text)
    meant = re.search(r'Did you mean "(\w+)"', text)
    hint = f"; did you mean {meant.group(1)}?" if meant else ""
    return f"unknown config key {where}{hint} (configs/base.py lists every config key)"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with user errors as one line (used by app.run instead of its default)."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]) and "--help" not in argv:
        fail("--config is required, e.g. --config=configs/cocohd_oproj_fc2.py (add :runlocal for a tiny CPU run)")
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error_line(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        fail(_unknown_key_line(str(e), argv))
    config = _CONFIG.value
    if not isinstance(config, config_dict.ConfigDict):
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        if not os.path.isfile(path):
            fail(f"--config: no such config file: {path}")
        try:
            config.arm  # noqa: B018 — raises the loading error
        except Exception as e:  # noqa: BLE001 — whatever the config file raised
            fail(f"--config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {str(e).splitlines()[-1]}")
        fail(f"--config: {path} does not define get_config() returning a ConfigDict")
    return rest


def check_schema(config) -> None:
    """An arm file may only set keys that configs/base.py defines."""
    from configs import base
    from lora_jax.errors import ConfigError

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("rank_overrides", "alpha_overrides"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    unknown = sorted(set(keys(config.to_dict())) - set(keys(base.get_config().to_dict())))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (see configs/base.py)")


def default_workdir() -> str:
    """workdir/<config file name without .py>, e.g. workdir/cocohd_oproj_fc2."""
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    return os.path.join("workdir", name)


def quiet_libraries(verbose: bool) -> None:
    """Library chatter (absl, orbax, tfds progress bars) only with --verbose."""
    logging.set_verbosity("info" if verbose else "warning")
    py_logging.getLogger().setLevel(py_logging.INFO if verbose else py_logging.WARNING)
    if not verbose:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()


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
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])} (flags are --config, --config.<key>=, --workdir, --verbose)")
    quiet_libraries(_VERBOSE.value)
    from data.records import DataError
    from lora_jax.errors import UserError

    try:
        import jax

        initialize_distributed(jax)
        config = _CONFIG.value
        check_schema(config)
        logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
        workdir = _WORKDIR.value or default_workdir()
        if config.mode == "eval":
            from lora_jax.run.eval_mode import evaluate

            evaluate(config, workdir)
        elif config.arms:
            from lora_jax.run.train_arms import train_arms

            train_arms(config, workdir)
        else:
            from lora_jax.run.train_loop import train_and_evaluate

            train_and_evaluate(config, workdir)
    except (UserError, DataError) as e:
        if _VERBOSE.value:
            raise
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
