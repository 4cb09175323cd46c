"""The values a freshly built model's parameters start from, drawn on the host with numpy.

An eager `jax.random.normal` or `jnp.ones` compiles one XLA program per shape: about a second
each on XLA:CPU, tens of seconds for one model with its norms, biases and kernels. numpy draws the
same tensors in microseconds and `jnp.asarray` only copies them. So a random base (`:runlocal`, the
tests, the benchmarks) is drawn here: `normal(key, ...)` seeds numpy's PCG64 from the jax key's
data, so `nnx.Rngs(seed)` still decides every weight, the same on every backend.

Under a trace (`nnx.eval_shape`, `jax.jit`) the key is abstract and only shapes matter: the draw
stays in jax there, and nothing is computed. A checkpoint's weights (io/) replace these values;
the adapters' fresh values (lora/delta.py) are drawn by jax, as before, so a run on a checkpoint
starts from the same adapters on every version of this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host_rng(key: jax.Array) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def normal(key: jax.Array, shape: tuple[int, ...], dtype, scale: float = 0.02) -> jax.Array:
    """N(0, scale^2) of `shape` in `dtype`, drawn in float32 from `key`."""
    if isinstance(key, jax.core.Tracer):
        return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
    values = _host_rng(key).standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return jnp.asarray(values.astype(dtype))


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    """U(-bound, bound) of `shape`, float32, from `key`."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape).astype(np.float32))


def constant(value: float, shape: tuple[int, ...], dtype) -> jax.Array:
    """`shape` filled with `value` (norm scales: 1, biases: 0), without compiling a program."""
    return jnp.asarray(np.full(shape, value, dtype=dtype))
