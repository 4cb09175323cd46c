"""Orbax checkpoints of a LoRA run: adapters + optimizer state + step + input-pipeline state + metadata.

The metadata (arm, targets, ranks, base fingerprint) guards the workdir: a run whose adapters would
not fit the checkpoint found there is refused before anything is written. Restoring takes the
target shardings of the *current* mesh, so a checkpoint restores onto a different mesh shape.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import traceback

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio

from lora_jax.errors import WorkdirError
from lora_jax.multihost import decided_on_process_0


class WorkdirMismatchError(WorkdirError):
    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys  # the identity keys that differ


@jax.jit
def _all_finite(tree) -> jax.Array:
    floats = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(floats)) if floats else jnp.bool_(True)


def all_finite(tree) -> bool:
    """True if no float leaf holds NaN/Inf (a jitted reduction: works on multi-host sharded arrays)."""
    return bool(_all_finite(tree))


class _OrbaxThreadErrors(logging.Filter):
    """Drops orbax's error records that carry an exception of its background writer threads: the same
    exception is raised again in the caller's thread, where `CheckpointStore` reports it as one line
    (instead of two tracebacks on stderr before it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        tb = record.exc_info[2] if record.exc_info else None
        files = {frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)} | {record.pathname}
        return not any(orbax in f for f in files) and "_SignalingThread.run() raised" not in record.getMessage()


for _name in ("absl", "asyncio"):  # asyncio: "Future exception was never retrieved" of an orbax write
    logging.getLogger(_name).addFilter(_OrbaxThreadErrors())


def _run_sync_draining(coro):
    """orbax's `asyncio_utils._run_sync_via_new_loop` (runs `coro` in a fresh event loop, then closes
    it), except that when `coro` fails, the loop's other tasks are first run to their end.

    Why: orbax gathers a save's tensorstore writes as tasks of that loop; when one write fails (a full
    disk), `coro` raises at once and orbax closed the loop while the sibling writes were still in
    flight. Each of them then finished on tensorstore's thread and either called
    `loop.call_soon_threadsafe` on the closed loop ("RuntimeError: Event loop is closed", a traceback
    printed by sys.unraisablehook) or left a "Future exception was never retrieved" -- after our
    one-line error, or interleaved with it. Waiting here (their failures, the same full disk, are
    collected and dropped; the first one is raised) means nothing of the failed save still runs once
    the error reaches `CheckpointStore`."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except Exception:
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# `run_sync` looks the helper up in its module at each call, so every orbax save, commit and
# finalize (the background commit threads included) runs through the draining version.
_orbax_asyncio._run_sync_via_new_loop = _run_sync_draining

# A tensorstore write error: `... No space left on device [os_error_code='28']`.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")


def _os_error(error: BaseException) -> OSError | None:
    """The OS error behind a failed orbax write (raised as OSError, or by tensorstore as a
    ValueError carrying os_error_code), else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        found = _TENSORSTORE_OS_ERROR.search(str(error))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


def _manager(directory: epath.Path, max_to_keep: int, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(directory, options=options)


class CheckpointStore:
    _pending: int | None = None  # the step of the last save started (the one a failed write belongs to)

    def __init__(
        self,
        workdir: str,
        max_to_keep: int,
        identity: dict,
        allowed_changes: tuple[str, ...] = (),
        absent: dict | None = None,
    ):
        """identity: JSON-able values a checkpoint must agree with to be resumed (but allowed_changes).
        absent: for keys added to the identity later, the value a checkpoint without the key had (a
        key without one matches any value)."""
        self.dir = epath.Path(workdir) / "checkpoints"
        self.identity = identity
        self.allowed_changes = allowed_changes
        self.absent = absent or {}
        self._check_workdir()
        self.manager = _manager(self.dir, max_to_keep, create=True)

    def _check_workdir(self) -> None:
        # Process 0 decides whether checkpoints/ exists: asked by each process, the answer races
        # process 0's mkdir below and the processes enter different orbax barriers.
        if not decided_on_process_0(lambda: "yes" if self.dir.exists() else ""):
            return
        existing = _manager(self.dir, 1, create=False)
        step = existing.latest_step()
        if step is None:
            return
        meta = existing.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        # A key the checkpoint does not record was written before that key joined the identity: it had
        # the key's `absent` value, or (none given) it matches.
        meta = {k: self.absent[k] for k in self.absent if k not in meta} | meta
        differ = [
            k for k in self.identity if k not in self.allowed_changes and k in meta and meta[k] != self.identity[k]
        ]
        if differ:
            what = "; ".join(f"{k}={meta.get(k)!r}, this run has {self.identity[k]!r}" for k in differ)
            raise WorkdirMismatchError(
                f"{self.dir}: holds a checkpoint of another run ({what}); use a fresh --workdir, or list the "
                "keys in --config.train.allow_changed_on_resume to change them on purpose",
                tuple(differ),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, lora, opt_state, data_state: dict, extra_meta: dict) -> None:
        """Starts writing checkpoint `step` (orbax finishes it in the background; `wait` joins it). A
        failed write (full disk, ...) of this or the previous save is a WorkdirError."""
        if not all_finite((lora, opt_state)):
            raise FloatingPointError(f"refusing to save step {step}: the state holds NaN/Inf")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({"lora": lora, "opt": opt_state}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(dict(self.identity, step=step, **extra_meta)),
        )
        self.wait()  # the previous save's failure is reported as that step's
        self._pending = step
        with self._write_errors():
            self.manager.save(step, args=args, force=True)

    def restore(self, step: int, lora_target, opt_target):
        """Restores onto the shardings carried by the (concrete or abstract) targets."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"lora": lora_target, "opt": opt_target},
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"]["lora"], out["state"]["opt"], out["data"], out["meta"]

    def wait(self) -> None:
        with self._write_errors():
            self.manager.wait_until_finished()

    def _write_errors(self):
        return _WriteErrors(self)

    def _remove_partial_steps(self) -> None:
        """Orbax writes a step to `<step>.orbax-checkpoint-tmp*` and renames it when complete: a failed
        write leaves only that, which is removed (finished steps are never touched)."""
        if jax.process_index() != 0 or not self.dir.exists():
            return
        for path in self.dir.iterdir():
            if ".orbax-checkpoint-tmp" not in path.name:
                continue
            if path.is_dir():
                path.rmtree()
            else:
                path.unlink(missing_ok=True)


class _WriteErrors:
    """Turns an OS error of an orbax write into one WorkdirError naming the workdir, the step and the OS
    error, after removing the partial step directory (the earlier checkpoints stay)."""

    def __init__(self, store: CheckpointStore):
        self.store = store

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        os_error = _os_error(error) if error is not None and not isinstance(error, WorkdirError) else None
        if os_error is None:
            return False
        store = self.store
        # Every other operation of the manager (the rest of this save, its finalize) ends before the
        # partial step is removed and the error is raised: their errors are the same full disk, and
        # nothing of orbax's may run or print after the one error line.
        try:
            store.manager.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 — the failure being reported, seen again
            pass
        finished = [s for s in store.manager.all_steps() if s != store._pending]
        try:
            store.manager.close()
        except Exception:  # noqa: BLE001, S110 — closing after a failed write may fail the same way
            pass
        store._remove_partial_steps()
        kept = f"the last finished checkpoint is step {max(finished)}" if finished else "no checkpoint was finished"
        reason = os_error.strerror or errno.errorcode.get(os_error.errno, str(os_error))
        raise WorkdirError(
            f"{store.dir.parent}: writing checkpoint step {store._pending} failed ({reason}); {kept}, and the "
            "partial step was removed: free space and run the same command to resume"
        ) from error
