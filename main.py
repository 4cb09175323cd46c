"""Entry point: python main.py --config=configs/cocohd_oproj_fc2.py[:runlocal] [--workdir=DIR] [--verbose]

A mistake in what the user gave (config, data, checkpoint, workdir) is one line on stderr naming the
key, file or value and what was expected, and exit status 2; a traceback means a bug (or --verbose).
"""

import difflib
import logging as py_logging
import os
import re
import sys
import traceback


def quiet_native_logs(argv: list[str]) -> None:
    """The C++ logs of XLA (and of TensorFlow, should a library import it): their CPU-feature, oneDNN
    and CUDA start-up notes, and absl's "All log messages before absl::InitializeLog()" warning, are
    not ours: off unless --verbose. Both read TF_CPP_MIN_LOG_LEVEL when their library loads, so this
    runs before anything imports them; a value the user set is kept."""
    if not any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv[1:]):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # 3: INFO, WARNING and ERROR lines off


quiet_native_logs(sys.argv)

from absl import app, flags, logging  # noqa: E402 — after the native logs are quieted
from ml_collections import config_dict, config_flags  # noqa: E402

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


def _library_frame(frame) -> bool:
    """A frame of this file, of the flag and config libraries, or of Python's import machinery."""
    module = str(frame.f_globals.get("__name__", "")).split(".")[0]
    ours = frame.f_code.co_filename == __file__
    return ours or module in ("absl", "ml_collections", "importlib") or frame.f_code.co_filename.startswith("<")


def _config_file_frame(error: Exception) -> tuple[traceback.FrameSummary, object] | None:
    """Where a config file (configs/base.py's locked config) set a key the schema lacks: the innermost
    frame of the traceback outside the libraries and this file, with the ConfigDict that refused it."""
    where, holder = None, None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, config_dict.ConfigDict):
            holder = owner
        elif not _library_frame(frame):
            where = traceback.FrameSummary(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
    return (where, holder) if where else None


def _unknown_key_line(error: Exception, argv: list[str]) -> str:
    """An unknown key as one line: the --config.<key>= flag that names it, or the config file's line
    that sets it (the config is locked: the assignment itself fails). Another AttributeError or
    KeyError raised by a config file is that file's line and the error."""
    text = str(error)
    key = re.search(r'Key "([^"]+)"', text) or re.search(r"'(\w+)", text)
    name = key.group(1) if key else text
    in_file = _config_file_frame(error)
    if in_file:
        frame, holder = in_file
        path = os.path.relpath(frame.filename)
        path = frame.filename if path.startswith("..") else path  # configs/x.py, or a file elsewhere in full
        where = f"{path}:{frame.lineno}: {frame.line}"
        if holder is None:  # not a ConfigDict's refusal: e.g. a misspelt function of configs/base.py
            return f"--config: {where}: {type(error).__name__}: {text}"
        meant = difflib.get_close_matches(name, list(holder.keys()), n=1)
        hint = f"; did you mean {meant[0]}?" if meant else ""
        return f"{where}: unknown config key {name}{hint} (configs/base.py lists every config key)"
    given = [a.split("=")[0] for a in argv[1:] if key and a.startswith("--config.") and name in a]
    where = given[0] if given else name
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
    except (AttributeError, KeyError) as e:  # ml_collections: a key the locked config lacks (file or flag)
        fail(_unknown_key_line(e, argv))
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


def check_schema(config: config_dict.ConfigDict) -> None:
    """The config has exactly configs/base.py's keys (ConfigError naming the others). A config built by
    base.get_config / base.arm_config is locked, so an unknown key already failed where it was set;
    this refuses a config file that builds its own ConfigDict, or unlocks base's to add a key."""
    from flax import traverse_util

    from configs import base
    from lora_jax.errors import ConfigError

    def keys(c: config_dict.ConfigDict) -> set[str]:
        return set(traverse_util.flatten_dict(c.to_dict(), sep="."))

    ours, schema = keys(config), keys(base.get_config())
    unknown, missing = sorted(ours - schema), sorted(schema - ours)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (configs/base.py lists every config key)")
    if missing:
        few = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(
            f"the config lacks {few}: build it with configs/base.py's get_config() or arm_config() "
            "(configs/base.py lists every config key)"
        )


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


def announce_to_xmanager(jax, workdir: str) -> None:
    """Each process's place and the workdir (TensorBoard, checkpoints) as a work-unit artifact, through
    clu's platform API: a platform that implements it (Google's internal XManager does) shows them;
    open-source clu's local work unit logs them at INFO (--verbose)."""
    from clu import platform

    work_unit = platform.work_unit()
    work_unit.set_task_status(f"process {jax.process_index()}/{jax.process_count()}")
    if jax.process_index() == 0:
        work_unit.create_artifact(platform.ArtifactType.DIRECTORY, workdir, "workdir")


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
        announce_to_xmanager(jax, workdir)
        if config.mode == "eval":
            from lora_jax.run.eval_mode import evaluate

            evaluate(config, workdir)
        else:  # one arm, or every arm of config.arms in one job
            from lora_jax.run.train_loop import train_and_evaluate

            train_and_evaluate(config, workdir)
    except (UserError, DataError) as e:
        if _VERBOSE.value:
            raise
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
