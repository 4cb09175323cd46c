"""Token-weighted cross-entropy computed in sequence chunks (never the full [B, T, vocab] logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden_btd, lm_head_dv, targets_bt, mask_bt, chunk: int = 512):
    """Returns (sum of nll * mask, sum of mask) in float32.

    hidden_btd: [batch, time, embed] final normed activations; lm_head_dv: [embed, vocab].
    Each chunk's logits are float32 and recomputed in the backward pass (jax.checkpoint), so peak
    memory is [batch, chunk, vocab] whatever the sequence length.
    """
    b, t, d = hidden_btd.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    w = lm_head_dv.astype(hidden_btd.dtype)

    @jax.checkpoint
    def chunk_nll(h, tgt, m):
        logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt_logit) * m)

    def step(total, xs):
        return total + chunk_nll(*xs), None

    xs = (
        jnp.moveaxis(hidden_btd.reshape(b, n, chunk, d), 1, 0),
        jnp.moveaxis(targets_bt.reshape(b, n, chunk), 1, 0),
        jnp.moveaxis(mask_bt.astype(jnp.float32).reshape(b, n, chunk), 1, 0),
    )
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask_bt.astype(jnp.float32))
