"""Rotary position embeddings (HF "rotate half" convention), angles always in float32."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lora_jax.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, with llama3 scaling when configured."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope.rope_type == "linear":  # positions divided by factor, i.e. every frequency
        return (inv_freq / rope.factor).astype(np.float32)
    # llama3: long wavelengths are divided by `factor`, short kept, the middle band interpolated.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions_bt: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [batch, time, head_dim // 2] in float32."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos_bth: jnp.ndarray, sin_bth: jnp.ndarray) -> jnp.ndarray:
    """Rotates x: [batch, time, ..., head_dim]; computed in float32, returned in x.dtype."""
    extra = x.ndim - 3
    shape = cos_bth.shape[:2] + (1,) * extra + cos_bth.shape[2:]
    cos, sin = cos_bth.reshape(shape), sin_bth.reshape(shape)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
