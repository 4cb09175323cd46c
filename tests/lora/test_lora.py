"""Per-submodule LoRA on a tiny random model: placement, zero-init, frozen base, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lora_jax.lora.arms import ARMS, TARGETS
from lora_jax.lora.delta import dropout_key, lora_delta
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions, Transformer, merge_lora, unmerge_lora
from tests.tiny_model import TINY

CFG = dataclasses.replace(TINY, qkv_bias=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 16)))


def _loss(model, tokens, key=None):
    logits = model(tokens[:, :-1], dropout_key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def _train_step(model, optimizer, tokens, key):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens, key)
    optimizer.update(model, grads)
    return loss, grads


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _lora_paths(model):
    return sorted(tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


@pytest.fixture(scope="module")
def base_logits():
    return np.asarray(_forward(Transformer(CFG, None, rngs=nnx.Rngs(0)), TOKENS))


# Each target alone and all four together: a pair arm (e.g. oproj_fc2) places its two targets by the
# same per-target code, so the five cover every placement (each arm is a compile of its own, ~13 s).
PLACEMENT_ARMS = [arm for arm, targets in ARMS.items() if len(targets) in (1, len(TARGETS))]


@pytest.mark.parametrize("arm", PLACEMENT_ARMS)
def test_arm_placement_zero_init_frozen_base_and_gradients(arm, base_logits):
    targets = ARMS[arm]
    model = Transformer(CFG, LoraSpec(targets=targets, rank=4, alpha=8, dropout=0.1), rngs=nnx.Rngs(0))
    assert _lora_paths(model) == sorted(
        [("layers", t, "lora_a") for t in targets] + [("layers", t, "lora_b") for t in targets]
    )
    # b = 0: identical to the base model (same seed draws the same base weights first)
    np.testing.assert_array_equal(np.asarray(_forward(model, TOKENS)), base_logits)

    frozen = jax.tree.map(np.array, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    opt_leaves = jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert sum(x.size for x in opt_leaves if x.ndim > 0) == 2 * n_lora  # Adam mu + nu of LoRA leaves only

    _, grads0 = _train_step(model, optimizer, TOKENS, dropout_key(0, 0))
    for t in targets:
        assert np.abs(grads0["layers"][t]["lora_b"].get_value()).max() > 0  # dB != 0 at step 0
        assert np.abs(grads0["layers"][t]["lora_a"].get_value()).max() == 0  # dA = 0 while B = 0
    _, grads1 = _train_step(model, optimizer, TOKENS, dropout_key(0, 1))
    for t in targets:
        assert np.abs(grads1["layers"][t]["lora_a"].get_value()).max() > 0  # dA != 0 after one update
    _train_step(model, optimizer, TOKENS, dropout_key(0, 2))
    after = jax.tree.map(np.array, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # bitwise unchanged


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match="valid targets: qkv, o_proj, fc1, fc2"):
        LoraSpec(targets=("q_proj",))
    with pytest.raises(ValueError, match="unknown key"):
        LoraSpec(targets=("qkv",), rank_overrides={"attn": 4})


def test_scales_overrides_and_rslora():
    spec = LoraSpec(targets=TARGETS, rank=16, alpha=32, rank_overrides={"fc2": 4}, alpha_overrides={"qkv": 8.0})
    assert spec.scale_for("o_proj") == 2.0 and spec.scale_for("fc2") == 8.0 and spec.scale_for("qkv") == 0.5
    assert LoraSpec(targets=("fc2",), rank=16, alpha=32, use_rslora=True).scale_for("fc2") == 8.0
    model = Transformer(CFG, spec, rngs=nnx.Rngs(0))
    assert model.layers.fc2.lora_a.get_value().shape == (2, 48, 4)
    assert model.layers.qkv.lora_b.get_value().shape == (2, 16, 2, 4, 8)


def test_lora_delta_is_the_plain_formula_and_vmaps_over_adapters():
    rng = np.random.default_rng(0)
    x, a, b = rng.normal(size=(3, 5)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    np.testing.assert_allclose(
        lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), 0.5), 0.5 * x @ a @ b, rtol=1e-5
    )
    a3, b3 = jnp.stack([a] * 3), jnp.stack([b, 2 * b, 3 * b])  # a leading adapter axis
    out = jax.vmap(lora_delta, in_axes=(None, 0, 0, None))(jnp.asarray(x), a3, b3, 1.0)
    np.testing.assert_allclose(out[2], 3 * x @ a @ b, rtol=1e-5)


def test_dropout_is_a_function_of_seed_and_step():
    spec = LoraSpec(targets=("o_proj",), rank=4, alpha=8, dropout=0.5)
    model = Transformer(CFG, spec, rngs=nnx.Rngs(0))
    b = model.layers.o_proj.lora_b
    b.set_value(jnp.ones_like(b.get_value()) * 0.1)
    f = jax.jit(lambda m, k: m(TOKENS, dropout_key=k))
    same = [np.asarray(f(model, dropout_key(3, 7))) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert np.abs(np.asarray(f(model, dropout_key(3, 8))) - same[0]).max() > 0
    assert np.abs(np.asarray(_forward(model, TOKENS)) - same[0]).max() > 0  # no key = no dropout (eval)


def test_merge_and_unmerge():
    """Merged kernels against the plain unmerged formula x·W + s·(x·A)·B (not the fused merged-weight
    matmul, which the default float32 path already uses)."""
    spec = LoraSpec(targets=TARGETS, rank=4, alpha=8)
    plain = RuntimeOptions(fused_lora_matmul=False)
    model = Transformer(CFG, spec, plain, rngs=nnx.Rngs(0))
    for t in TARGETS:
        b = getattr(model.layers, t).lora_b
        b.set_value(jnp.asarray(np.random.default_rng(1).normal(size=b.get_value().shape) * 0.1, jnp.float32))
    before = np.asarray(_forward(model, TOKENS))
    assert np.abs(before - np.asarray(_forward(Transformer(CFG, None, plain, rngs=nnx.Rngs(0)), TOKENS))).max() > 1e-3
    kernel = np.asarray(model.layers.qkv.kernel.get_value())
    merge_lora(model)
    np.testing.assert_allclose(np.asarray(_forward(model, TOKENS)), before, atol=1e-5)
    unmerge_lora(model)
    np.testing.assert_allclose(np.asarray(model.layers.qkv.kernel.get_value()), kernel, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_forward(model, TOKENS)), before, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)


def test_options_are_validated():
    with pytest.raises(ValueError, match="model.remat"):
        RuntimeOptions(remat="sometimes")


def test_merged_weight_lora_matmul_matches_the_plain_formula_and_its_gradients():
    from lora_jax.lora.delta import lora_matmul

    rng = np.random.default_rng(0)
    for x_shape, w_shape, n_in in [((2, 5, 6), (6, 3, 4), 1), ((2, 5, 2, 3, 4), (2, 3, 4, 7), 3)]:
        x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
        a = jnp.asarray(rng.normal(size=w_shape[:n_in] + (2,)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(2,) + w_shape[n_in:]), jnp.float32)
        ct = jnp.asarray(rng.normal(size=x_shape[: x.ndim - n_in] + w_shape[n_in:]), jnp.float32)

        def plain(x, a, b):
            return ((jnp.tensordot(x, w, n_in) + lora_delta(x, a, b, 1.0)) * ct).sum()

        def fused(x, a, b):
            return (lora_matmul(x, w, a, b, n_in) * ct).sum()

        np.testing.assert_allclose(fused(x, a, b), plain(x, a, b), rtol=1e-5)
        for got, want in zip(jax.grad(fused, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
