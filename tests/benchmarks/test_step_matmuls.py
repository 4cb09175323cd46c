"""benchmarks/step_matmuls.py counts the train step's matmuls exactly, and runs them as they are written.

The count is checked against lora_jax.train.accounting's training-step FLOPs, exactly: under the layer
scan every layer runs the whole backward, so the two agree once the `xla` attention's full (not
causal-half) score matrices are added. With the layers unrolled, autodiff leaves out layer 0's input
gradients upstream of its first adapter (nothing below needs them), and the count shows exactly those.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.step_matmuls import DotAlone, dot_flops, einsum_spec, step_dots
from lora_jax.lora.arms import TARGETS
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.train import accounting
from lora_jax.train.step import StepOptions, make_optimizer, make_train_step
from tests.tiny_model import TINY

CFG = dataclasses.replace(TINY, num_layers=3)
B, T, RANK = 2, 32, 4


def tiny_step_dots(targets, scan_layers: bool):
    """The dots of a train step of CFG (loss in 2 chunks, the plain LoRA path), from its jaxpr."""
    spec = LoraSpec(targets=targets, rank=RANK, alpha=8)
    opts = RuntimeOptions(scan_layers=scan_layers, fused_lora_matmul=False, attention_impl="xla")
    model = nnx.eval_shape(lambda: Transformer(CFG, spec, opts, rngs=nnx.Rngs(0)))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx, schedule = make_optimizer(1e-3, 0, 10, 0.0, 1.0)
    step = make_train_step(graphdef, tx, StepOptions(loss_chunk_tokens=T // 2), schedule)
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {n: ints for n in ("tokens", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((B, T), jnp.float32)
    return step_dots(step, lora, jax.eval_shape(tx.init, lora), frozen, batch, 0)


def counted_step_flops(targets, scan_layers: bool) -> int:
    return sum(dot_flops(d) * n for d, n in tiny_step_dots(targets, scan_layers).items())


def accounted_flops(targets) -> float:
    """accounting's step FLOPs + the half of each score matrix that `xla` attention computes but a
    causal count leaves out (forward, and twice that in the backward)."""
    spec = LoraSpec(targets=targets, rank=RANK, alpha=8)
    causal_attention = accounting.attention_flops_per_token(CFG, T) * B * T
    return accounting.train_flops_per_step(CFG, spec, B, T) + 3 * causal_attention


@pytest.mark.parametrize("targets", [("o_proj", "fc2"), TARGETS])
def test_the_scanned_steps_dots_are_the_accounted_flops(targets):
    assert counted_step_flops(targets, scan_layers=True) == accounted_flops(targets)


def test_unrolled_autodiff_skips_layer_0_input_gradients_below_its_first_adapter():
    e, d, heads, kv = CFG.hidden_size, CFG.head_dim, CFG.num_heads, CFG.num_kv_heads
    qkv_dx = 2 * e * (heads + 2 * kv) * d
    attention_backward = 2 * (2 * 2 * T * heads * d)  # the full score and value matmuls, backward
    o_proj_dx = 2 * heads * d * e
    lora_dx = 2 * RANK * heads * d  # the adapter's (dy B) -> dx half; (dy B) itself feeds dA
    skipped = (qkv_dx + attention_backward + o_proj_dx + lora_dx) * B * T
    assert counted_step_flops(("o_proj", "fc2"), scan_layers=False) == accounted_flops(("o_proj", "fc2")) - skipped
    # Adapters on qkv: only the frozen qkv's and the adapter's input gradients into the embedding go.
    skipped = (qkv_dx + 2 * RANK * e) * B * T
    assert counted_step_flops(TARGETS, scan_layers=False) == accounted_flops(TARGETS) - skipped


def test_einsum_spec_is_the_dot_general():
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5, 2, 4), np.float32), rng.standard_normal((4, 6, 3, 2), np.float32)
    numbers = (((3, 2), (0, 3)), ((0,), (2,)))  # contract a's 3 and 2 with b's 0 and 3; batch a0 = b2
    want = jax.lax.dot_general(a, b, numbers)
    got = torch.einsum(einsum_spec((a.shape, b.shape, "float32", numbers)), torch.from_numpy(a), torch.from_numpy(b))
    assert want.shape == (3, 5, 6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert dot_flops((a.shape, b.shape, "float32", numbers)) == 2 * 3 * 5 * 6 * 4 * 2


def test_each_of_a_steps_dots_computes_the_same_on_xla_and_torch():
    """What the floor times on each side is the same product, for every dot of a real step."""
    import torch

    dots = tiny_step_dots(TARGETS, scan_layers=True)
    assert len(dots) > 10 and any(d[3][1][0] for d in dots)  # batched (attention) dots among them
    for dot in dots:
        alone = DotAlone(dot)
        with torch.no_grad():
            want = np.asarray(alone.xla())
            np.testing.assert_allclose(alone.torch().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_while_loop_or_a_cond_is_refused_not_miscounted():
    def f(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

    with pytest.raises(ValueError, match="under a while"):
        step_dots(f, jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="under a cond"):
        step_dots(lambda x, p: jax.lax.cond(p, lambda: x @ x, lambda: x), jnp.ones((4, 4)), True)
    # a cond without dots is counted through (its dots: none)
    count = step_dots(lambda x, p: jax.lax.cond(p, lambda: x + 1, lambda: x) @ x, jnp.ones((4, 4)), True)
    assert sum(count.values()) == 1


def test_the_profiled_dots_are_the_instructions_that_hold_one():
    from benchmarks.step_matmuls import _union_seconds, dot_instructions

    x = jnp.ones((64, 64))
    hlo = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a + jnp.exp(a)).lower(x).compile().as_text()
    dots, executed = dot_instructions(hlo)
    assert len(executed) == 2  # the two products (on XLA:CPU: YNNPACK fusions), not the tanh or exp
    assert not any(dots[n] for n in executed)  # holding nothing but the product
    assert not dot_instructions(jax.jit(lambda a: jnp.exp(a) + 1).lower(x).compile().as_text())[0]
    # a dot fused with other work is reported with that work
    hlo = jax.jit(lambda a: (jnp.exp(a) @ a.T).sum()).lower(x).compile().as_text()
    dots, executed = dot_instructions(hlo)
    assert len(executed) == 1 and {"exponential", "reduce"} <= dots[executed.pop()]
    # overlapping intervals (picoseconds) count once: [0, 3) u [2, 5) u [7, 8) = 6
    assert _union_seconds([(2, 5), (0, 3), (7, 8)]) * 1e12 == pytest.approx(6)


def test_a_profile_finds_every_dot_of_every_execution_loop_bodies_included(tmp_path):
    from benchmarks.step_matmuls import traced_seconds

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0] @ w

    x, w = jnp.ones((128, 128)) * 0.01, jnp.ones((128, 128)) * 0.01
    fn = jax.jit(f)
    hlo = fn.lower(x, w).compile().as_text()
    step, dots, mixed = traced_seconds(lambda: fn(x, w).block_until_ready(), hlo, 2, str(tmp_path))
    assert 0 < dots <= step and not mixed
