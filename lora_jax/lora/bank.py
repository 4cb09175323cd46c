"""A bank of K adapters over one frozen base: the spec, and the LoRA math with an adapter axis.

Each arm k has its own LoraSpec (targets, rank, alpha, layers). Per target t the bank stores only
the arms that carry t ("members", in arm order) on a slot axis, padded to the largest member rank:

    lora_a [layers, slots, *in, rank_max]     lora_b [layers, slots, rank_max, *out]

Zero padding is exact: a padded rank column of A and row of B start at zero, get zero gradient
(x·A_pad = 0 and B_pad = 0) and so stay zero under AdamW; the arm computes exactly its own rank-r
adapter. An arm without target t has no slot there, so it costs nothing on t.

Two row layouts:
  * grouped (training, loss evaluation): every input row is repeated once per arm, row b*K + k
    belongs to arm k. Each target's delta is computed on its members' rows only (a static gather),
    batched over the slot axis — one base matmul for all arms, one small batched matmul per target.
  * per-row ids (decoding): `adapter_ids[row]` in [-1, K) picks the row's arm; -1 = the base
    model. A row's A and B are gathered, so a batch mixing nine adapters costs what one costs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.lora.arms import TARGETS
from lora_jax.lora.spec import LoraSpec

BASE_ROW = -1  # adapter id of a row served by the base model alone


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """K named arms, each a LoraSpec, over one base. Hashable: it is static model metadata."""

    names: tuple[str, ...]
    specs: tuple[LoraSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "specs", tuple(self.specs))
        if not self.specs or len(self.names) != len(self.specs):
            raise ConfigError(f"an adapter bank needs one name per arm, got {self.names} for {len(self.specs)} specs")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"adapter bank arms must be distinct, got {self.names}")
        rates = {s.dropout for s in self.specs}
        if len(rates) > 1:
            raise ConfigError(f"the arms of one bank must share lora.dropout, got {sorted(rates)}")

    @property
    def num_arms(self) -> int:
        return len(self.specs)

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target some arm carries, in canonical order."""
        return tuple(t for t in TARGETS if any(t in s.targets for s in self.specs))

    @property
    def dropout(self) -> float:
        return self.specs[0].dropout

    def members(self, target: str) -> tuple[int, ...]:
        """The arms carrying `target`, in arm order; member i sits in slot i."""
        return tuple(k for k, s in enumerate(self.specs) if target in s.targets)

    def rank(self, target: str) -> int:
        """The slot axis' rank: the largest member rank (0 when no arm carries the target)."""
        return max((self.specs[k].rank_for(target) for k in self.members(target)), default=0)

    def slot_table(self, target: str) -> np.ndarray:
        """[K] int32: arm -> its slot for `target`, -1 where the arm does not carry it."""
        table = np.full((self.num_arms,), -1, np.int32)
        for slot, k in enumerate(self.members(target)):
            table[k] = slot
        return table

    def scale_table(self, target: str, num_layers: int) -> np.ndarray:
        """[layers, slots] float32: each member's scale (alpha/r or rsLoRA) on each layer, 0 outside
        its lora.layers."""
        table = np.zeros((num_layers, len(self.members(target))), np.float32)
        for slot, k in enumerate(self.members(target)):
            spec = self.specs[k]
            layers = spec.layers or range(num_layers)
            table[list(layers), slot] = spec.scale_for(target)
        return table

    def check_layers(self, num_layers: int) -> None:
        for name, spec in zip(self.names, self.specs):
            if spec.layers and spec.layers[-1] >= num_layers:
                raise ConfigError(f"arm {name}: lora.layers={spec.layers}; the model has layers 0..{num_layers - 1}")


def check_adapter_ids(adapter_ids, num_arms: int, rows: int) -> np.ndarray:
    """Per-row adapter ids as int32 [rows]; a clear error for a wrong length or an id outside [-1, K)."""
    ids = np.asarray(adapter_ids)
    if ids.shape != (rows,) or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"adapter_ids must be {rows} integers (one per row), got shape {ids.shape} {ids.dtype}")
    bad = [(r, int(i)) for r, i in enumerate(ids) if not BASE_ROW <= i < num_arms]
    if bad:
        row, value = bad[0]
        raise ConfigError(
            f"adapter_ids[{row}]={value} is out of range: the bank has {num_arms} adapters "
            f"(ids 0..{num_arms - 1}, or {BASE_ROW} for the base model)"
        )
    return ids.astype(np.int32)


def grouped_delta(x, a, b, scale, members: tuple[int, ...], num_arms: int):
    """Adapter deltas for rows laid out b*K + k (row b of arm k).

    x: [B*K, *mid, *in]; a: [S, *in, r]; b: [S, r, *out]; scale: [S] -> [B*K, *mid, *out].
    Only the member arms' rows are computed (the others get zero)."""
    n_in, out_dims = a.ndim - 2, b.shape[2:]
    rows, mid = x.shape[0], x.shape[1 : x.ndim - n_in]
    xk = x.reshape(rows // num_arms, num_arms, math.prod(mid), -1)  # [B, K, T, IN]
    if len(members) < num_arms:
        xk = jnp.take(xk, jnp.asarray(members), axis=1)  # [B, S, T, IN]
    a2 = a.reshape(a.shape[0], -1, a.shape[-1]).astype(x.dtype)  # [S, IN, r]
    b2 = b.reshape(b.shape[0], b.shape[1], -1).astype(x.dtype)  # [S, r, OUT]
    # dot_general puts the batch (slot) axis first: [S, B, T, r], then [S, B, T, OUT].
    h = jax.lax.dot_general(xk, a2, (((3,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    out = jax.lax.dot_general(h.astype(x.dtype), b2, (((3,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    out = (out * scale[:, None, None, None]).astype(x.dtype)
    out = jnp.swapaxes(out, 0, 1)  # [B, S, T, OUT]
    if len(members) < num_arms:
        full = jnp.zeros((out.shape[0], num_arms) + out.shape[2:], out.dtype)
        out = full.at[:, jnp.asarray(members)].set(out)
    return out.reshape((rows, *mid, *out_dims))


def row_delta(x, a, b, scale, slots):
    """Adapter deltas with one slot per row (-1 = none: zero delta).

    x: [R, *mid, *in]; a: [S, *in, r]; b: [S, r, *out]; scale: [S]; slots: [R] int32 -> [R, *mid, *out]."""
    n_in, out_dims = a.ndim - 2, b.shape[2:]
    rows, mid = x.shape[0], x.shape[1 : x.ndim - n_in]
    on = slots >= 0
    s = jnp.where(on, slots, 0)
    a_r = jnp.take(a.reshape(a.shape[0], -1, a.shape[-1]), s, axis=0).astype(x.dtype)  # [R, IN, r]
    b_r = jnp.take(b.reshape(b.shape[0], b.shape[1], -1), s, axis=0).astype(x.dtype)  # [R, r, OUT]
    x2 = x.reshape(rows, math.prod(mid), -1)
    h = jnp.einsum("rti,rik->rtk", x2, a_r, preferred_element_type=jnp.float32).astype(x.dtype)
    out = jnp.einsum("rtk,rko->rto", h, b_r, preferred_element_type=jnp.float32)
    out = out * jnp.where(on, jnp.take(scale, s), 0.0)[:, None, None]
    return out.astype(x.dtype).reshape((rows, *mid, *out_dims))
