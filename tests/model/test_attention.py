import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.model.attention import causal_block_attention, chunked_attention, get_attention_impl, reference_attention


def _packed_inputs(seed=0, b=2, t=37, kh=2, g=3, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, kh, g, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 15:], seg[0, 30:], seg[1, 20:] = 2, 0, 2  # two packed examples per row, padding in row 0
    pos = np.zeros_like(seg)
    for r in range(b):
        for i in range(1, t):
            pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def _naive(q, k, v, pos, seg, window):
    """Loops over every (query, key) pair in numpy: the independent reference."""
    q, k, v, pos, seg = map(np.asarray, (q, k, v, pos, seg))
    b, t, kh, g, d = q.shape
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(t):
            keys = [j for j in range(t) if seg[r, j] == seg[r, i] != 0 and pos[r, j] <= pos[r, i]]
            if window is not None:
                keys = [j for j in keys if pos[r, i] - pos[r, j] < window]
            if not keys:
                continue
            for h in range(kh):
                s = q[r, i, h] @ k[r, keys, h].T * 0.3  # [g, n]
                p = np.exp(s - s.max(-1, keepdims=True))
                out[r, i, h] = (p / p.sum(-1, keepdims=True)) @ v[r, keys, h]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_reference_and_chunked_match_naive_loops_and_each_other(window):
    q, k, v, pos, seg = _packed_inputs()
    naive = _naive(q, k, v, pos, seg, window)
    ref = reference_attention(q, k, v, pos, pos, seg, seg, window=window, scale=0.3)
    chunked = chunked_attention(q, k, v, pos, pos, seg, seg, window=window, scale=0.3, q_block=8, kv_block=16)
    np.testing.assert_allclose(ref, naive, atol=1e-5)
    np.testing.assert_allclose(chunked, naive, atol=1e-5)
    q, k, v, pos, seg = (x[:, :32] for x in (q, k, v, pos, seg))  # causal blocks need a multiple of the block
    blocked = causal_block_attention(q, k, v, pos, pos, seg, seg, window=window, scale=0.3, block=8)
    np.testing.assert_allclose(blocked, naive[:, :32], atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_gradients_match_reference(window):
    q, k, v, pos, seg = _packed_inputs(1)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(fn, **kw):
        return jax.grad(lambda *a: (fn(*a, pos, pos, seg, seg, window=window, scale=0.3, **kw) * ct).sum(), (0, 1, 2))

    ref = loss(reference_attention)(q, k, v)
    chunked = jax.jit(loss(chunked_attention, q_block=8, kv_block=16))(q, k, v)
    for a, b in zip(ref, chunked):
        np.testing.assert_allclose(a, b, atol=2e-5)
    q, k, v, pos, seg, ct = (x[:, :32] for x in (q, k, v, pos, seg, ct))
    ref = loss(reference_attention)(q, k, v)
    for a, b in zip(ref, jax.jit(loss(causal_block_attention, block=8))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_traced_window_and_bf16():
    q, k, v, pos, seg = _packed_inputs(3)
    ref = reference_attention(q, k, v, pos, pos, seg, seg, window=4, scale=0.3)
    f = jax.jit(lambda w: chunked_attention(q, k, v, pos, pos, seg, seg, window=w, scale=0.3, q_block=8, kv_block=8))
    np.testing.assert_allclose(f(jnp.int32(4)), ref, atol=1e-5)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = chunked_attention(*bf, pos, pos, seg, seg, scale=0.3, q_block=8, kv_block=8)
    assert out.dtype == jnp.bfloat16
    full = reference_attention(q, k, v, pos, pos, seg, seg, scale=0.3)
    assert float(jnp.abs(out.astype(jnp.float32) - full).max()) < 0.05


@pytest.mark.parametrize("window", [None, 5])
def test_causal_blocks_in_bfloat16_follow_the_float32_reference(window):
    """The hand-written backward in bfloat16 (probabilities and dS cast to the inputs' dtype for the
    matmuls): outputs and gradients within bfloat16 rounding of the float32 reference."""
    q, k, v, pos, seg = (x[:, :32] for x in _packed_inputs(4))
    ct = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)

    def grads(fn, *qkv, **kw):
        def loss(*a):
            return (fn(*a, pos, pos, seg, seg, window=window, scale=0.3, **kw).astype(jnp.float32) * ct).sum()

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*qkv)

    ref_out = reference_attention(q, k, v, pos, pos, seg, seg, window=window, scale=0.3)
    bf_in = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    bf_out = causal_block_attention(*bf_in, pos, pos, seg, seg, window=window, scale=0.3, block=8)
    assert bf_out.dtype == jnp.bfloat16
    assert float(jnp.abs(bf_out.astype(jnp.float32) - ref_out).max()) < 0.03 * float(jnp.abs(ref_out).max())
    _, ref = grads(reference_attention, q, k, v)
    _, bf = grads(causal_block_attention, *bf_in, block=8)
    for a, b in zip(ref, bf):
        assert b.dtype == jnp.bfloat16
        scale = float(jnp.abs(a).max())
        assert float(jnp.abs(b.astype(jnp.float32) - a).max()) < 0.03 * scale


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="valid: causal_blocks, chunked, xla"):
        get_attention_impl("flash9")


def test_chunked_attention_with_the_kv_cache_matches_the_reference():
    """Prefill 13 tokens, then decode 7 one at a time, with chunked attention: the logits of the full
    sequence under the reference attention without a cache."""
    from flax import nnx

    from lora_jax.model.transformer import RuntimeOptions, Transformer
    from lora_jax.serve.generate import init_cache
    from tests.tiny_model import TINY, forward_with_cache

    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, size=(2, 20)))
    ref = Transformer(TINY, None, RuntimeOptions(attention_impl="xla"), rngs=nnx.Rngs(0))(tokens)
    model = Transformer(TINY, None, RuntimeOptions(attention_impl="chunked"), rngs=nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    ones = jnp.ones((2, 20), jnp.int32)
    cache = init_cache(model, 2, 40)
    logits, cache = forward_with_cache(model, tokens[:, :13], positions[:, :13], ones[:, :13], cache)
    steps = [logits]
    for i in range(13, 20):
        logits, cache = forward_with_cache(model, tokens[:, i : i + 1], positions[:, i : i + 1], ones[:, :1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    "impl, remat, scan",
    [
        ("causal_blocks", "none", True),
        ("causal_blocks", "none", False),
        ("causal_blocks", "dots", True),
        ("causal_blocks", "full", False),
        ("chunked", "dots", True),
    ],
)
def test_model_lora_gradients_through_each_kernel_and_remat_equal_the_reference(impl, remat, scan, monkeypatch):
    """The LoRA gradients of a whole model's loss (every target adapted, two packed examples per row and
    padding) through the causal blocks' hand-written backward (blocks of 8 over 32 tokens) or the chunked
    kernel, under each remat policy, scanned or unrolled, against `xla` attention without remat."""
    import dataclasses
    import functools

    from flax import nnx

    from lora_jax.lora.arms import TARGETS
    from lora_jax.lora.spec import LoraSpec
    from lora_jax.model import attention as attention_lib
    from lora_jax.model.transformer import RuntimeOptions, Transformer
    from tests.tiny_model import TINY

    small = {"block": 8} if impl == "causal_blocks" else {"q_block": 8, "kv_block": 8}
    monkeypatch.setitem(attention_lib._IMPLS, "small", functools.partial(get_attention_impl(impl), **small))
    cfg = dataclasses.replace(TINY, num_layers=3)
    _, _, _, pos, seg = _packed_inputs(t=32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=seg.shape), jnp.int32)

    def lora_grads(opts):
        model = Transformer(cfg, LoraSpec(targets=TARGETS, rank=4, alpha=8), opts, rngs=nnx.Rngs(0))
        for i, t in enumerate(TARGETS):  # B != 0: every adapter is in the loss
            b = getattr(model.layers, t).lora_b
            b.set_value(jnp.asarray(np.random.default_rng(i).normal(size=b.get_value().shape) * 0.1, jnp.float32))
        graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lora):
            logits = nnx.merge(graphdef, lora, frozen)(tokens, pos, seg)
            logp = jax.nn.log_softmax(logits)
            return -jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * (seg > 0))

        return jax.jit(jax.grad(loss))(lora)

    ref = lora_grads(RuntimeOptions(attention_impl="xla"))
    got = lora_grads(RuntimeOptions(attention_impl="small", remat=remat, scan_layers=scan))
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
        assert float(jnp.max(jnp.abs(r))) > 1e-3, path  # every leaf has a real gradient
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.max(jnp.abs(r))), rtol=0, err_msg=str(path))
