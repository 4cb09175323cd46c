"""Orbax checkpoints of a LoRA run: adapters + optimizer state + step + input-pipeline state + metadata.

The metadata (arm, targets, ranks, base fingerprint) guards the workdir: a run whose adapters would
not fit the checkpoint found there is refused before anything is written. Restoring takes the
target shardings of the *current* mesh, so a checkpoint restores onto a different mesh shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

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


def _manager(directory: epath.Path, max_to_keep: int, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(directory, options=options)


class CheckpointStore:
    def __init__(self, workdir: str, max_to_keep: int, identity: dict, allowed_changes: tuple[str, ...] = ()):
        """identity: JSON-able values a checkpoint must agree with to be resumed (but allowed_changes)."""
        self.dir = epath.Path(workdir) / "checkpoints"
        self.identity = identity
        self.allowed_changes = allowed_changes
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
        # A key the checkpoint does not record matches: it was written before that key joined the identity.
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
        if not all_finite((lora, opt_state)):
            raise FloatingPointError(f"refusing to save step {step}: the state holds NaN/Inf")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({"lora": lora, "opt": opt_state}),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(dict(self.identity, step=step, **extra_meta)),
        )
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
        self.manager.wait_until_finished()
