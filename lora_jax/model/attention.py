"""Grouped-query attention: a plain XLA reference and a chunked, memory-bounded (flash-style) version.

Layout is head-major by KV group so a tensor-parallel split keeps heads whole:
  q: [batch, q_time, kv_heads, q_per_kv, head_dim]   k, v: [batch, kv_time, kv_heads, head_dim]
Which keys a query sees is decided by positions and segment ids only, so the same code serves
packed training rows (segments never attend across each other), sliding windows and a KV cache
(cache slots carry the position and segment of the token stored there; segment 0 = empty/padding).
Scores, softmax and the log-sum-exp are float32 in every mode. Rows that see no key return 0.

Accelerator kernels (splash attention on TPU, cuDNN on GPU) plug in with `register_attention_impl`.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError

_NEG = -1e30  # finite, so fully-masked blocks never produce inf - inf = NaN
_NO_WINDOW = 2**30


class AttentionFn(Protocol):
    """`window` is None or a Python int (the model compiles each window kind with its window static:
    transformer._attend); an int32 scalar array is accepted too, and then only masks."""

    def __call__(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window, scale: float) -> jax.Array: ...


def attention_mask(q_pos, kv_pos, q_seg, kv_seg, window: int | None) -> jax.Array:
    """[batch, 1, 1, q_time, kv_time] bool: causal by position, same non-zero segment, optional window."""
    qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = (kp <= qp) & (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if window is not None:
        allowed &= qp - kp < window  # transformers: kv_idx > q_idx - sliding_window
    return allowed[:, None, None]


def reference_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, scale=1.0):
    """Materialises all [q_time, kv_time] scores; the ground truth the other implementations match."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, window)
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    probs = probs * jnp.any(mask, axis=-1, keepdims=True)
    # The value matmul head-major, result [b, kv, g, t, d]: per (b, kv) one [g*t, s] @ [s, d] matmul.
    # Asked for [b, t, kv, g, d] directly, XLA:CPU oriented a bfloat16 prefill over a head-major
    # per-layer cache as a lone bf16 x bf16 -> f32 dot, which its runtime cannot execute.
    vh = jnp.swapaxes(v, 1, 2)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)


def causal_block_schedule(t: int, block: int, window) -> list[tuple[int, int, int]]:
    """(first query, first key, end) of each query block: the keys [first key, end) it computes.

    Above the diagonal nothing is computed. With a static window W a query at index i sees keys
    i - W + 1 .. i of its own segment (positions advance by one per index within a segment: packed
    rows, left padding), so the key blocks wholly before the block's first query's window are left
    out too: a sliding layer's work grows with W, not with the row. A traced window (an array)
    cannot decide slices, so it only masks."""
    static = window is not None and not isinstance(window, jax.Array)
    out = []
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        first = (max(0, lo - int(window) + 1) // block) * block if static else 0
        out.append((lo, first, hi))
    return out


def causal_block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, scale=1.0, block=64):
    """Dense attention that skips the key blocks above the diagonal (fast fwd+bwd at moderate lengths)
    and, for a sliding layer, those before its window (`causal_block_schedule`).

    Valid when queries and keys are the same sequence (training, scoring): a key after its query in
    the row is always masked (causal within a segment, other segments masked), so query block i
    only needs key blocks 0..i. Head-major layout ([batch, kv_heads, q_per_kv * block, head_dim])
    makes each score matmul one batched GEMM. Memory is O(time²), so long contexts use "chunked".
    The backward is written by hand (`_blocks_bwd`): autodiff of the block loop padded every block's
    key gradients to the full length and summed them, and sliced the saved blocks again; ~10-15%
    slower per layer on XLA:CPU (fwd + bwd, the bench shape).
    Falls back to the reference with a KV cache or a length that is not a multiple of `block`.
    """
    b, t, kh, g, d = q.shape
    if k.shape[1] != t or t % block or t <= block:
        return reference_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, scale=scale)
    n = t // block
    schedule = tuple(causal_block_schedule(t, block, window))
    # [b, kv, n, g * block, d]: query block i is one contiguous [g * block, d] matrix per (batch, kv head).
    qb = jnp.transpose(q.reshape(b, n, block, kh, g, d), (0, 3, 1, 4, 2, 5)).reshape(b, kh, n, g * block, d)
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, kv, t, d]
    masks = [
        attention_mask(q_pos[:, lo:hi], kv_pos[:, first:hi], q_seg[:, lo:hi], kv_seg[:, first:hi], window)
        for lo, first, hi in schedule
    ]
    out = _attend_blocks(qb, kt, vt, masks, schedule, float(scale), g)
    return jnp.transpose(out.reshape(b, kh, n, g, block, d), (0, 2, 4, 1, 3, 5)).reshape(b, t, kh, g, d)


def _block_probs(qi, kj, mask, scale, g):
    """Softmax probabilities [b, kv, g * block, keys] (float32) of one query block; rows that see no key are 0."""
    b, kh, rows, _ = qi.shape
    keys = kj.shape[2]
    s = jnp.einsum("bkqd,bksd->bkqs", qi, kj, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s.reshape(b, kh, g, rows // g, keys), _NEG)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = e * (jnp.any(mask, axis=-1, keepdims=True) / jnp.sum(e, axis=-1, keepdims=True))
    return p.reshape(b, kh, rows, keys)


def _blocks_forward(qb, kt, vt, masks, schedule, scale, g):
    outs, probs = [], []
    for i, (_, first, hi) in enumerate(schedule):
        p = _block_probs(qb[:, :, i], kt[:, :, first:hi], masks[i], scale, g)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(vt.dtype), vt[:, :, first:hi], preferred_element_type=jnp.float32)
        outs.append(pv)
        probs.append(p)
    return jnp.stack(outs, axis=2).astype(qb.dtype), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend_blocks(qb, kt, vt, masks, schedule, scale, g):
    return _blocks_forward(qb, kt, vt, masks, schedule, scale, g)[0]


def _blocks_fwd(qb, kt, vt, masks, schedule, scale, g):
    out, probs = _blocks_forward(qb, kt, vt, masks, schedule, scale, g)
    return out, (qb, kt, vt, out, probs)


def _blocks_bwd(schedule, scale, g, res, d_out):
    """Per query block, from its saved probabilities: dQ of the block, and dK, dV added in place into
    the key range [first, end) it saw (the usual softmax VJP: dS = P * (dP - rowsum(dO * O)))."""
    qb, kt, vt, out, probs = res
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dk, dv, dqs = jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32), []
    for i, (_, first, hi) in enumerate(schedule):
        p, doi, qi = probs[i], d_out[:, :, i], qb[:, :, i]
        dv = dv.at[:, :, first:hi].add(
            jnp.einsum("bkqs,bkqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
        )
        dp = jnp.einsum("bkqd,bksd->bkqs", doi, vt[:, :, first:hi], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, i]) * scale).astype(qi.dtype)
        dqs.append(jnp.einsum("bkqs,bksd->bkqd", ds, kt[:, :, first:hi], preferred_element_type=jnp.float32))
        dk = dk.at[:, :, first:hi].add(jnp.einsum("bkqs,bkqd->bksd", ds, qi, preferred_element_type=jnp.float32))
    dq = jnp.stack(dqs, axis=2)
    return dq.astype(qb.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None


_attend_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def _blocks(x, block: int):
    """[batch, time, ...] -> [time // block, batch, block, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, t // block, block) + x.shape[2:]), 1, 0)


def _unblock(x):
    """Inverse of `_blocks`."""
    n, b, blk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * blk) + x.shape[3:])


def _pad_time(x, multiple: int, value=0):
    t = x.shape[1]
    pad = (-t) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _block_scores(qi, kj, qpos, kpos, qseg, kseg, window, scale):
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(qpos, kpos, qseg, kseg, window)
    return jnp.where(mask, s, _NEG), mask


def _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, scale, q_block, kv_block):
    b, _, kh, g, d = q.shape
    kb = (_blocks(k, kv_block), _blocks(v, kv_block), _blocks(kv_pos, kv_block), _blocks(kv_seg, kv_block))

    def one_query_block(args):
        qi, qpos, qseg = args

        def kv_step(carry, kv):
            kj, vj, kpos, kseg = kv

            def update(carry):
                m, l, acc = carry
                s, mask = _block_scores(qi, kj, qpos, kpos, qseg, kseg, window, scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + p.sum(-1)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, acc * corr[..., None] + pv

            # Causal block skipping: a key block no query of this block may see is never computed.
            visible = jnp.any(attention_mask(qpos, kpos, qseg, kseg, window))
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        init = (
            jnp.full((b, kh, g, q_block), _NEG, jnp.float32),
            jnp.zeros((b, kh, g, q_block), jnp.float32),
            jnp.zeros((b, kh, g, q_block, d), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(kv_step, init, kb)
        l_safe = jnp.where(l == 0, 1.0, l)
        out = jnp.einsum("bkgqd->bqkgd", acc / l_safe[..., None])
        return out.astype(q.dtype), m + jnp.log(l_safe)

    out, lse = jax.lax.map(one_query_block, (_blocks(q, q_block), _blocks(q_pos, q_block), _blocks(q_seg, q_block)))
    return _unblock(out), lse  # lse: [n_q_blocks, batch, kv_heads, q_per_kv, q_block]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, scale, q_block, kv_block):
    return _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, scale, q_block, kv_block)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, scale, q_block, kv_block):
    out, lse = _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, scale, q_block, kv_block)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, out, lse)


def _flash_bwd(scale, q_block, kv_block, res, d_out):
    """One pass over the (key block, query block) pairs that any query may see: the probabilities of a
    pair are recomputed once and feed dQ, dK and dV together; masked pairs (above the causal diagonal,
    other segments, outside the window) are skipped."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, out, lse = res
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    qb = (_blocks(q, q_block), _blocks(q_pos, q_block), _blocks(q_seg, q_block), _blocks(d_out, q_block))
    qb += (lse, jnp.moveaxis(delta.reshape(delta.shape[:3] + (-1, q_block)), 3, 0))
    kb = (_blocks(k, kv_block), _blocks(v, kv_block), _blocks(kv_pos, kv_block), _blocks(kv_seg, kv_block))
    n_q = qb[0].shape[0]

    def kv_block_step(dq, kargs):
        kj, vj, kpos, kseg = kargs

        def q_block_step(carry, xs):
            i, (qi, qpos, qseg, doi, lsei, deltai) = xs

            def update(carry):
                dq, dk, dv = carry
                s, mask = _block_scores(qi, kj, qpos, kpos, qseg, kseg, window, scale)
                p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - deltai[..., None])
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
                return dq.at[i].add(dq_i), dk, dv

            visible = jnp.any(attention_mask(qpos, kpos, qseg, kseg, window))
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(q_block_step, (dq, zeros, zeros), (jnp.arange(n_q), qb))
        return dq, (dk * scale, dv)

    dq0 = jnp.zeros(qb[0].shape, jnp.float32)  # [n_q_blocks, batch, q_block, kv_heads, q_per_kv, head_dim]
    dq, (dk, dv) = jax.lax.scan(kv_block_step, dq0, kb)
    dq = _unblock(dq) * scale
    return (dq.astype(q.dtype), _unblock(dk).astype(k.dtype), _unblock(dv).astype(v.dtype)) + (None,) * 5


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, scale=1.0, q_block=512, kv_block=512):
    """Flash-style attention: memory O(block²) per step, forward and backward (custom VJP)."""
    t, s = q.shape[1], k.shape[1]
    q_block, kv_block = min(q_block, t), min(kv_block, s)
    qp = [_pad_time(x, q_block) for x in (q, q_pos, q_seg)]
    kp = [_pad_time(x, kv_block) for x in (k, v, kv_pos)] + [_pad_time(kv_seg, kv_block)]  # pad seg 0 = masked
    # The window travels as an array (a traced per-layer value under the layer scan); None = unbounded.
    window = jnp.asarray(_NO_WINDOW if window is None else window, jnp.int32)
    out = _flash(qp[0], kp[0], kp[1], qp[1], kp[2], qp[2], kp[3], window, float(scale), q_block, kv_block)
    return out[:, :t]


_IMPLS: dict[str, Callable] = {
    "xla": reference_attention,
    "chunked": chunked_attention,
    "causal_blocks": causal_block_attention,
}


def register_attention_impl(name: str, fn: AttentionFn) -> None:
    """Plugs in an accelerator kernel (e.g. splash on TPU, cuDNN on GPU) under `model.attention_impl`."""
    _IMPLS[name] = fn


def get_attention_impl(name: str) -> Callable:
    if name not in _IMPLS:
        raise ConfigError(f"model.attention_impl={name!r} is unknown; valid: {', '.join(sorted(_IMPLS))}")
    return _IMPLS[name]
