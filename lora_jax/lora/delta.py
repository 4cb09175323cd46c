"""The LoRA math as pure functions, LoRA dropout, and the adapters' initialisation.

`lora_delta(x, a, b, scale)` is the whole adapter computation of one adapter; `lora_matmul` fuses it
with the frozen kernel where that pays. Several adapters over one frozen base (an adapter axis) are
bank.py's batched form of it. The targets and arms are in arms.py, LoraSpec in spec.py.
"""

from __future__ import annotations

import functools
import hashlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.lora.arms import TARGETS


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array) -> jax.Array:
    """The adapter's contribution `scale * (x @ A) @ B`.

    x: [..., *in_dims]; a: [*in_dims, rank]; b: [rank, *out_dims] -> [..., *out_dims].
    Computed in x's dtype with float32 accumulation.
    """
    n_in = a.ndim - 1
    h = jnp.tensordot(x, a.astype(x.dtype), axes=n_in, preferred_element_type=jnp.float32).astype(x.dtype)
    out = jnp.tensordot(h, b.astype(x.dtype), axes=1, preferred_element_type=jnp.float32)
    return (out * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x, w, a, b, n_in: int):
    """`x @ w + (x @ a) @ b` (scale folded into b by the caller) as ONE matmul with the merged weight.

    Forward and the input gradient use W' = W + A·B (a cheap [in, r] x [r, out] product), so no
    skinny rank-r chain sits on the activation path; dA and dB come from rank-r matmuls. W is frozen
    (its cotangent is zero and never materialised by XLA when unused).
    """
    return _merged_matmul(x, w, a, b, n_in)


def delta_weight(a: jax.Array, b: jax.Array) -> jax.Array:
    """The adapter as a weight, float32: A [*in, r] · B [r, *out] -> [*in, *out] (one layer, unscaled)."""
    r = a.shape[-1]
    delta = jnp.dot(a.reshape(-1, r), b.reshape(r, -1), preferred_element_type=jnp.float32)
    return delta.reshape(a.shape[:-1] + b.shape[1:])


def lora_a_bound(shape: tuple[int, ...]) -> float:
    """A of shape [layers, *in, r] is drawn as PEFT draws it: kaiming-uniform(a=sqrt(5)) = U(±bound),
    bound = 1/sqrt(fan_in)."""
    return 1.0 / math.sqrt(math.prod(shape[1:-1]))


def init_lora_a(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A of shape [layers, *in, r]: U(±lora_a_bound(shape)), float32."""
    bound = lora_a_bound(shape)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _merged(w, a, b):
    return (w.astype(jnp.float32) + delta_weight(a, b)).astype(w.dtype)


def _merged_matmul(x, w, a, b, n_in):
    return jnp.tensordot(x, _merged(w, a, b), axes=n_in, preferred_element_type=jnp.float32).astype(x.dtype)


def _lora_matmul_fwd(x, w, a, b, n_in):
    return _merged_matmul(x, w, a, b, n_in), (x, w, a, b)


def _lora_matmul_bwd(n_in, res, g):
    x, w, a, b = res
    merged = _merged(w, a, b)
    out_axes = tuple(range(g.ndim - (merged.ndim - n_in), g.ndim))
    w_out_axes = tuple(range(n_in, merged.ndim))
    dx = jnp.tensordot(g, merged, axes=(out_axes, w_out_axes), preferred_element_type=jnp.float32).astype(x.dtype)
    lead = x.ndim - n_in
    x2 = x.reshape(-1, math.prod(x.shape[lead:]))  # [tokens, in]
    g2 = g.reshape(-1, math.prod(g.shape[lead:]))  # [tokens, out]
    r = a.shape[-1]
    a2, b2 = a.reshape(-1, r).astype(x.dtype), b.reshape(r, -1).astype(x.dtype)
    xa = jnp.dot(x2, a2, preferred_element_type=jnp.float32)  # [n, r]
    gb = jnp.dot(g2, b2.T, preferred_element_type=jnp.float32)  # [n, r]
    da = jnp.dot(x2.T, gb.astype(x.dtype), preferred_element_type=jnp.float32).reshape(a.shape)
    db = jnp.dot(xa.astype(x.dtype).T, g2, preferred_element_type=jnp.float32).reshape(b.shape)
    return dx, jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def dropout_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The dropout key of one training step: a pure function of (seed, step), so a resumed run repeats it."""
    return jax.random.fold_in(jax.random.key(seed), step)


def row_dropout_keys(key: jax.Array, num_rows: int) -> jax.Array:
    """One key per global batch row, [num_rows]: a row's dropout masks then depend on which row it is,
    not on the micro-batch it lands in, so accumulation 4 equals accumulation 1 with dropout too."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(num_rows))


def lora_dropout(x: jax.Array, rate: float, key: jax.Array | None, layer: jax.Array, target: str) -> jax.Array:
    """Inverted dropout on the LoRA input x [B, T, ...]; randomness from (key, layer, target).

    key: one key for the whole batch, or one per row ([B], from `row_dropout_keys`)."""
    if key is None or rate == 0.0:
        return x

    def keep(k, shape):
        k = jax.random.fold_in(jax.random.fold_in(k, layer), TARGETS.index(target))
        return jax.random.bernoulli(k, 1.0 - rate, shape)

    mask = jax.vmap(lambda k: keep(k, x.shape[1:]))(key) if key.ndim == 1 else keep(key, x.shape)
    return jnp.where(mask, x / (1.0 - rate), 0.0).astype(x.dtype)


def init_adapters(model: nnx.Module, seed: int) -> None:
    """Fresh adapters from `seed` (A random, B zero), whatever seed built the base: the same rule as
    load_hf_model, so a seed sweep varies the adapters and the data order, never the base."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        value = var.get_value()
        var.set_value(init_lora_tensor(path, value.shape, seed, value.sharding, zeros=path[-1] == "lora_b"))


def init_lora_tensor(path, shape, seed, sharding, zeros):
    """The fresh value of the adapter tensor at `path`: zeros (B), or A from a key of (seed, path)."""
    if zeros:
        return _zeros_program(shape, sharding)()
    key = jax.random.fold_in(jax.random.key(seed), int(hashlib.md5(str(path).encode()).hexdigest()[:7], 16))
    return _lora_a_program(shape, sharding)(key)


# One compiled program per (shape, sharding), the key an argument: every model built in a process
# (each arm, seed and test) reuses it, where a program per call compiled for seconds on CPU.
@functools.cache
def _zeros_program(shape, sharding):
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)


@functools.cache
def _lora_a_program(shape, sharding):
    return jax.jit(lambda key: init_lora_a(key, shape), out_shardings=sharding)
