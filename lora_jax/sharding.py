"""Logical axis names -> the ("data", "fsdp", "tensor") mesh, in one small rules table.

Every parameter carries `logical_axes` metadata. A dimension that does not divide its mesh axis is
replicated with a warning (not an error), so odd vocabularies and tiny test models still shard.
The LoRA rank axis is never sharded.

Serving (decode latency, `eval.latency.mesh`) uses its own mesh, not the training one: under FSDP every
decode token would gather (or reduce) across every device, so TPOT would measure the interconnect. The
rule (`serving_mesh`), over this process's devices:
  "auto"     one device when the weights and the KV cache fit one device's free memory
             (`device.memory_stats()`; a backend without memory stats, e.g. CPU, counts as fitting),
             else tensor-parallel over the kv heads on the most devices that divide num_kv_heads;
  "single"   one device, always;
  "tensor"   tensor-parallel on the most devices that divide num_kv_heads (at least 2);
  "tensor:N" tensor-parallel on exactly N devices (N must divide num_kv_heads).
A serving mesh is (data=1, fsdp=1, tensor=n), so the same rules table shards heads and the MLP over
"tensor" and replicates the rest; `resharded` copies a model (Transformer, Llava, adapter bank) onto it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
_WARNED: set = set()

# logical axis -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "norm": None,
    "kv_heads": "tensor",
    "qkv_slot": None,
    "q_slot": None,
    "head_dim": None,
    "gate_up": None,
    "mlp": "tensor",
    "lora_rank": None,
    "adapters": None,  # an adapter bank's slot axis (adapter_bank.py): every device holds every arm
    # Activations: rows over the data-parallel axes (FSDP shards rows too), heads and the MLP
    # intermediate over "tensor"; the sequence and the residual width stay whole.
    "act_batch": ("data", "fsdp"),
    "act_len": None,
    "act_embed": None,
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """`mesh.shape` with at most one -1 ("the rest") -> concrete sizes; ValueError if it cannot fit."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape {shape}: sizes must be positive, with at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh.shape {shape} does not fit {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(f"mesh.shape {shape} needs {int(np.prod(shape))} devices, but {num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes: GSPMD propagates shardings (with jax 0.10's default
    Explicit axes the embedding gather fails with DuplicateSpecError)."""
    devices = devices if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def partition_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec for one array; indivisible dimensions are replicated with a warning."""
    spec, used = [], set()
    for name, dim in zip(logical_axes, shape):
        mesh_axes = LOGICAL_RULES.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if size == 1:
            spec.append(None)
        elif dim % size:
            if (name, dim, size) not in _WARNED:
                _WARNED.add((name, dim, size))
                logging.warning(
                    "axis %r of size %d does not divide mesh axes %s (%d); replicating", name, dim, mesh_axes, size
                )
            spec.append(None)
        else:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical axes, when traced under a mesh (`under_mesh`); else x.

    Without these GSPMD may keep whole activations on every device (at 7B and 32K tokens that does
    not fit), since only parameters and the batch carry shardings into the jitted step."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(logical_axes, x.shape, mesh))


def under_mesh(fn, mesh: Mesh):
    """fn traced with `mesh` as the abstract mesh, so `constrain` applies inside it."""

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
    """A pytree of NamedShardings matching `state` (of Variables, abstract or concrete)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [batch, ...]: the batch axis split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Moves every variable of `model` onto its sharding (in place)."""
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jax.device_put(var.get_value(), variable_sharding(var, mesh)))


SERVING_MESHES = ("auto", "single", "tensor", "tensor:N")


def parse_serving_mesh(value: str, key: str = "eval.latency.mesh") -> tuple[str, int | None]:
    """ "auto" | "single" | "tensor" | "tensor:N" -> (kind, N or None); ConfigError naming `key` otherwise."""
    kind, _, size = str(value).partition(":")
    if kind in ("auto", "single", "tensor") and not size:
        return kind, None
    if kind == "tensor" and size.isdigit() and int(size) >= 1:
        return kind, int(size)
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(SERVING_MESHES)}")


def fits_one_device(device, num_bytes: int) -> bool:
    """Whether `num_bytes` fit in the device's free memory (bytes_limit - bytes_in_use); True when the
    backend reports no memory stats (CPU: host memory)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if not stats or "bytes_limit" not in stats:
        return True
    return num_bytes <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def serving_mesh(value: str, num_kv_heads: int, num_bytes: int, devices=None, key: str = "eval.latency.mesh") -> Mesh:
    """The (1, 1, n) decode mesh the rule in the module docstring picks (devices: default this process's).

    num_bytes: what serving holds (weights + KV cache), for "auto"'s fit test. A mesh that cannot be
    built (too few devices, a size that does not divide num_kv_heads) is a ConfigError naming `key`."""
    kind, size = parse_serving_mesh(value, key)
    devices = list(devices if devices is not None else jax.local_devices())
    most = max(n for n in range(1, len(devices) + 1) if num_kv_heads % n == 0)
    if kind == "single" or (kind == "auto" and (most == 1 or fits_one_device(devices[0], num_bytes))):
        size = 1
    elif kind == "auto":
        size = most
    elif size is None:
        if most < 2:
            raise ConfigError(
                f"{key}={value!r}: tensor parallelism needs at least 2 devices dividing num_kv_heads="
                f"{num_kv_heads}, and {len(devices)} device(s) are available"
            )
        size = most
    elif num_kv_heads % size or size > len(devices):
        raise ConfigError(
            f"{key}={value!r}: {size} must divide num_kv_heads={num_kv_heads} and be at most the "
            f"{len(devices)} device(s) available"
        )
    return make_mesh((1, 1, size), devices=devices[:size])


def check_serving_mesh(value: str, num_kv_heads: int, devices=None, key: str = "eval.latency.mesh") -> None:
    """ConfigError naming `key` now if `serving_mesh` could not build `value` for this model here
    (the memory test of "auto" waits for the measurement: it never fails)."""
    serving_mesh(value, num_kv_heads, 0, devices, key)


def resharded(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """A copy of `module` (any NNX model: Transformer, Llava, a bank model) whose variables live on
    `mesh` by their logical axes; `module` is left as it is. An array already placed so is not copied.
    Arrays that span other processes are gathered to every host first (each host serves alone)."""
    graphdef, state = nnx.split(module)

    def move(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        return var.copy(jax.device_put(value, variable_sharding(var, mesh)))

    return nnx.merge(graphdef, jax.tree.map(move, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """{"data": …, "fsdp": …, "tensor": …} of a ("data", "fsdp", "tensor") mesh."""
    return {axis: int(mesh.shape[axis]) for axis in MESH_AXES}


def process_rows(sharding, global_batch_size: int) -> list[int]:
    """The global batch rows this process's devices hold under `sharding` (all rows when replicated)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, 1)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    return sorted(rows)


def global_batch(local: dict, sharding, size: int | None = None) -> dict:
    """Host arrays holding this process's rows of a batch of `size` rows (default: all of them, one
    process) -> global arrays on `sharding`. The rows are those `process_rows` gives for the sharding,
    so this is right for any mesh, also when the batch is replicated across processes."""
    size = size or next(iter(local.values())).shape[0]
    return {k: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:]) for k, v in local.items()}
