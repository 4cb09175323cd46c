"""The compiled step loops over layers once whatever the depth; parameter and FLOP accounting."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax.lora.arms import ARMS, TARGETS
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.config import ModelConfig
from lora_jax.model.transformer import RuntimeOptions, Transformer
from lora_jax.train import accounting
from tests.tiny_model import TINY

CFG = dataclasses.replace(TINY)


def _lowered_train_step(num_layers, impl="xla", remat="none"):
    cfg = dataclasses.replace(CFG, num_layers=num_layers)
    spec = LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8)
    opts = RuntimeOptions(attention_impl=impl, remat=remat)
    model = nnx.eval_shape(lambda: Transformer(cfg, spec, opts, rngs=nnx.Rngs(0)))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def step(lora, frozen, tokens):
        def loss(lora):
            m = nnx.merge(graphdef, lora, frozen)
            return m(tokens).mean()

        return jax.grad(loss)(lora)

    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    return jax.jit(step).lower(lora, frozen, tokens).as_text()


@pytest.mark.parametrize("impl,remat", [("xla", "none"), ("chunked", "dots")])
def test_one_loop_over_layers_whatever_the_depth(impl, remat):
    shallow, deep = _lowered_train_step(2, impl, remat), _lowered_train_step(8, impl, remat)
    loops = [len(re.findall(r"stablehlo\.while", t)) for t in (shallow, deep)]
    assert loops[0] == loops[1] >= 2  # a forward and a backward loop, the same count at 2 and 8 layers
    assert abs(len(deep) - len(shallow)) / len(shallow) < 0.02  # program size does not grow with depth


def test_unrolled_layers_do_grow_the_program():
    """Control: without the scan the same check sees the program grow (so the test above can fail)."""

    def size(n):
        cfg = dataclasses.replace(CFG, num_layers=n)
        m = nnx.eval_shape(lambda: Transformer(cfg, None, RuntimeOptions(scan_layers=False), rngs=nnx.Rngs(0)))
        g, s = nnx.split(m)
        return len(jax.jit(lambda s, t: nnx.merge(g, s)(t)).lower(s, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())

    assert size(8) > 2 * size(2)


@pytest.mark.parametrize("arm", list(ARMS))
def test_trainable_param_counts_match_the_model(arm):
    spec = LoraSpec(targets=ARMS[arm], rank=4, alpha=8, rank_overrides={"fc1": 2})
    model = nnx.eval_shape(lambda: Transformer(CFG, spec, rngs=nnx.Rngs(0)))
    actual = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        actual[path[1]] = actual.get(path[1], 0) + int(np.prod(var.get_value().shape))
    assert accounting.lora_params_per_target(CFG, spec) == actual
    peft = accounting.peft_equivalent_params_per_target(CFG, spec)
    if "qkv" in spec.targets:  # one shared A instead of three
        assert actual["qkv"] < peft["qkv"]
        assert peft["qkv"] - actual["qkv"] == 2 * CFG.num_layers * 4 * CFG.hidden_size


def hlo_dot_flops(hlo_text: str) -> int:
    """2 x output elements x contracted size, summed over every `dot` of a compiled HLO module."""
    shapes, total = {}, 0
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]", line)
        if not m:
            continue
        shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
        if " dot(" in line:
            lhs = re.search(r" dot\(%([^,\s)]+)", line).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            k = math.prod(shapes[lhs][int(d)] for d in contracting.split(",") if d)
            total += 2 * math.prod(shapes[m.group(1)]) * k
    return total


def test_forward_flops_equal_the_matmuls_xla_compiles():
    """Our forward count against the dots of XLA's compiled forward, exactly (LoRA terms are ~1.5% of it,
    so a tolerance would hide them); XLA's cost analysis adds only elementwise work on top.

    XLA computes the full (not causal-half) score matrix, so the other half is added before comparing.
    Layers are unrolled (a while-loop body appears once in the HLO); the plain LoRA path is compiled
    (the fused merged-weight path forms A·B once per call, not per token)."""
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )
    b, t = 2, 128
    for spec in (LoraSpec(targets=("o_proj", "fc2"), rank=8, alpha=16), LoraSpec(targets=TARGETS, rank=4, alpha=8)):
        opts = RuntimeOptions(scan_layers=False, fused_lora_matmul=False)
        model = nnx.eval_shape(lambda: Transformer(cfg, spec, opts, rngs=nnx.Rngs(0)))
        g, s = nnx.split(model)
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
        compiled = jax.jit(lambda s, x: nnx.merge(g, s)(x)).lower(s, tokens).compile()
        ours = (accounting.forward_flops_per_token(cfg, spec, t) + accounting.attention_flops_per_token(cfg, t)) * b * t
        assert hlo_dot_flops(compiled.as_text()) == ours
        no_lora = (
            (accounting.forward_flops_per_token(cfg, None, t) + accounting.attention_flops_per_token(cfg, t)) * b * t
        )
        assert hlo_dot_flops(compiled.as_text()) != no_lora
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert ours <= cost["flops"] < 1.02 * ours


def test_train_flops_definition():
    spec = LoraSpec(targets=("o_proj",), rank=4, alpha=8)
    lora = accounting.lora_params_per_target(CFG, spec)["o_proj"]
    matmul = 2 * (accounting.base_matmul_params(CFG) + lora)
    attn = 2 * 2 * CFG.num_layers * 8 * CFG.num_heads * CFG.head_dim  # T = 16
    assert accounting.train_flops_per_token(CFG, spec, 16) == 2 * matmul + 3 * attn + 2 * lora
    assert accounting.base_matmul_params(CFG) == 2 * (32 * 64 + 32 * 32 + 2 * 32 * 48 + 48 * 32) + 32 * 61
    assert accounting.measure_matmul_peak(n=256) > 0


def _train_step_temp_bytes(mesh_shape, devices) -> int:
    """Per-device temporary memory of the compiled train step (bench model, batch 8 x 512)."""
    from configs import base
    from lora_jax.run.config import lora_spec, random_model_config, runtime_options
    from lora_jax.sharding import global_batch, make_mesh, state_shardings
    from lora_jax.train.trainer import build_trainer

    config = base.get_config()
    bench = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4)
    for key, value in dict(bench, head_dim=64).items():
        config.model[key] = value
    config.model.param_dtype = config.model.compute_dtype = "float32"
    config.model.attention_impl, config.model.remat = "causal_blocks", "none"
    config.lora.targets = ("o_proj", "fc2")
    config.train.global_batch_size, config.data.max_seq_len = 8, 512
    mesh = make_mesh(mesh_shape, devices=devices)
    model = nnx.eval_shape(
        lambda: Transformer(random_model_config(config), lora_spec(config), runtime_options(config), rngs=nnx.Rngs(0))
    )
    state = nnx.state(model)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    zeros = lambda v, s: jax.device_put(np.zeros(v.get_value().shape, v.get_value().dtype), s)  # noqa: E731
    nnx.update(model, jax.tree.map(zeros, state, state_shardings(state, mesh), is_leaf=is_var))
    t = build_trainer(model, config, mesh)
    host = {k: np.zeros((8, 512), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    batch = global_batch(dict(host, loss_mask=np.zeros((8, 512), np.float32)), t.batch_sharding)
    compiled = t.train_step.lower(t.lora, t.opt_state, t.frozen, batch, 0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activations_are_partitioned_over_the_mesh():
    """On an 8-device 1x8x1 (FSDP) mesh each device's temporaries in the compiled train step are at most
    a quarter of one device's: activations are sharded by rows, not replicated (without the activation
    constraints this ratio was 0.71)."""
    one = _train_step_temp_bytes((1, 1, 1), jax.devices()[:1])
    eight = _train_step_temp_bytes((1, 8, 1), jax.devices())
    assert eight <= one / 4, (eight, one)
