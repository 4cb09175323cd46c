"""The values a freshly built model's parameters start from, drawn on the host with numpy.

An eager `jax.random.normal` or `jnp.ones` compiles one XLA program per shape: about a second
each on XLA:CPU, tens of seconds for one model with its norms, biases and kernels. numpy draws
tensors of the same distribution (not the same values as jax.random) in microseconds and
`jnp.asarray` only copies them. So a random base (`:runlocal`, the tests, the benchmarks) is drawn
here: `normal(key, ...)` seeds numpy's PCG64 from the jax key's data, so `nnx.Rngs(seed)` still
decides every weight, the same on every backend. DRAW_RULE names this rule in the fingerprint of a
random base (run/assemble.py): a workdir or adapter made on a base drawn otherwise is refused.

Under a trace (`nnx.eval_shape`) the key is abstract and only shapes matter: the draw stays in jax
there and nothing is computed. Building a model with real values under `jax.jit` would draw other
weights than an eager build: nothing does (models are built eagerly or abstractly). A checkpoint's
weights (io/) replace these values, and `lora.delta.init_adapters` redraws the adapters with jax
(the values PEFT-format runs have always started from); only a `Transformer(...)` built directly
keeps the host-drawn A of its adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DRAW_RULE = "host-numpy-pcg64-v1"


def _host_rng(key: jax.Array) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def normal(key: jax.Array, shape: tuple[int, ...], dtype, scale: float = 0.02, transpose: bool = False) -> jax.Array:
    """N(0, scale^2) of `shape` in `dtype`, drawn in float32 from `key`; transpose: the draw's
    transpose (a parameter whose layout changed keeps the values it was drawn with)."""
    if isinstance(key, jax.core.Tracer):
        values = (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
        return values.T if transpose else values
    values = _host_rng(key).standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return jnp.asarray((values.T if transpose else values).astype(dtype))


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    """U(-bound, bound) of `shape`, float32, from `key`."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape).astype(np.float32))


def constant(value: float, shape: tuple[int, ...], dtype) -> jax.Array:
    """`shape` filled with `value` (norm scales: 1, biases: 0), without compiling a program."""
    return jnp.asarray(np.full(shape, value, dtype=dtype))
