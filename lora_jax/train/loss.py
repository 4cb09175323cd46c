"""Token-weighted cross-entropy computed in sequence chunks (never the full [B, T, vocab] logits).

Each chunk's gradient with respect to the hidden states is formed in the forward pass
(d nll / d h = ((softmax - onehot) * mask) @ W, W the [vocab, embed] head) and kept instead of the logits, so the backward
pass neither stores nor recomputes the [B, chunk, vocab] logits. The LM head is frozen in LoRA
training, so no gradient flows to it. With Gemma's final soft-capping the loss is on
cap * tanh(logits / cap), and the chain rule's factor 1 - tanh² enters d nll / d h.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_forward(h, w, tgt, m, cap):
    logits = jnp.einsum("bcd,vd->bcv", h, w, preferred_element_type=jnp.float32)
    if cap is not None:
        tanh = jnp.tanh(logits / cap)
        logits = cap * tanh
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    nll = jnp.sum((lse - tgt_logit) * m)
    dlogits = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tgt, logits.shape[-1], dtype=jnp.float32)
    if cap is not None:
        dlogits = dlogits * (1.0 - tanh * tanh)
    dh = jnp.einsum("bcv,vd->bcd", (dlogits * m[..., None]).astype(h.dtype), w, preferred_element_type=jnp.float32)
    return nll, dh.astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_nll(h, w, tgt, m, cap):
    return _chunk_forward(h, w, tgt, m, cap)[0]


def _chunk_nll_fwd(h, w, tgt, m, cap):
    nll, dh = _chunk_forward(h, w, tgt, m, cap)
    return nll, (dh, w, tgt, m)


def _chunk_nll_bwd(cap, res, g):
    dh, w, tgt, m = res
    return (g * dh).astype(dh.dtype), jnp.zeros_like(w), None, jnp.zeros_like(m)


_chunk_nll.defvjp(_chunk_nll_fwd, _chunk_nll_bwd)


def chunked_cross_entropy(hidden_btd, lm_head_vd, targets_bt, mask_bt, chunk: int = 512, softcap: float | None = None):
    """Returns (sum of nll * mask, sum of mask) in float32.

    hidden_btd: [batch, time, embed] final normed activations; lm_head_vd: [vocab, embed] (frozen,
    as stored: see Transformer.lm_head_weight);
    softcap: the model's final logit soft-capping (None: none).
    Peak memory is [batch, chunk, vocab] whatever the sequence length.
    """
    b, t, d = hidden_btd.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    mask_bt = mask_bt.astype(jnp.float32)
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    w = lm_head_vd.astype(hidden_btd.dtype)

    def step(total, xs):
        return total + _chunk_nll(xs[0], w, xs[1], xs[2], softcap), None

    xs = (
        jnp.moveaxis(hidden_btd.reshape(b, n, chunk, d), 1, 0),
        jnp.moveaxis(targets_bt.reshape(b, n, chunk), 1, 0),
        jnp.moveaxis(mask_bt.reshape(b, n, chunk), 1, 0),
    )
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask_bt)
