"""Adapters on a range of layers only (lora.layers = PEFT's layers_to_transform): PEFT logits, the
round trip, merging, parameter counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.errors import ConfigError
from lora_jax.io.hf_checkpoint import load_hf_model
from lora_jax.io.peft_adapter import export_peft, read_peft_adapter, set_lora_weights
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions, merge_lora
from lora_jax.sharding import make_mesh
from lora_jax.train.accounting import lora_params_per_target
from tests.hf_reference import hf_logits, saved_hf_dir

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))
SPEC = LoraSpec(targets=("qkv", "o_proj", "fc2"), rank=4, alpha=8, layers=(1,))


@jax.jit
def _fwd(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def adapted():
    mesh = make_mesh((1, 2, 4))
    model = load_hf_model(saved_hf_dir("llama"), SPEC, RuntimeOptions(), mesh)
    rng = np.random.default_rng(2)
    for t in SPEC.targets:  # B != 0 on every layer: layer 0's must still add nothing
        var = getattr(model.layers, t).lora_b
        var.set_value(
            jax.device_put(
                jnp.asarray(rng.normal(size=var.get_value().shape) * 0.2, jnp.float32), var.get_value().sharding
            )
        )
    return model, mesh


def test_layer_range_adapter_loads_in_peft_with_equal_logits(adapted, tmp_path):
    model, mesh = adapted
    export_peft(model, str(tmp_path), saved_hf_dir("llama"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    ours = np.asarray(_fwd(model, jnp.asarray(TOKENS)))
    ref = hf_logits(saved_hf_dir("llama"), TOKENS, adapter_dir=str(tmp_path))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    base = hf_logits(saved_hf_dir("llama"), TOKENS)
    assert np.abs(ref - base).max() > 1e-2  # the adapter on layer 1 does change the logits

    spec, weights = read_peft_adapter(str(tmp_path), model.config)  # and back
    assert spec.layers == (1,) and spec.targets == SPEC.targets
    back = load_hf_model(saved_hf_dir("llama"), spec, RuntimeOptions(), mesh)
    set_lora_weights(back, weights)
    np.testing.assert_allclose(np.asarray(_fwd(back, jnp.asarray(TOKENS))), ours, atol=1e-5)


def test_merging_a_layer_range_and_counting_its_parameters(adapted):
    from flax import nnx

    model, _ = adapted
    merged = nnx.clone(model)  # new Variables: merging must not touch `model` (merge(*split()) shares them)
    merge_lora(merged)
    np.testing.assert_allclose(
        np.asarray(_fwd(merged, jnp.asarray(TOKENS))), np.asarray(_fwd(model, jnp.asarray(TOKENS))), atol=1e-4
    )
    everywhere = lora_params_per_target(model.config, LoraSpec(targets=SPEC.targets, rank=4, alpha=8))
    assert {t: 2 * n for t, n in lora_params_per_target(model.config, SPEC).items()} == everywhere  # 1 of 2 layers
    with pytest.raises(ConfigError, match=r"lora.layers=\(5,\): the model has layers 0..1"):
        load_hf_model(
            saved_hf_dir("llama"),
            LoraSpec(targets=("o_proj",), layers=(5,)),
            RuntimeOptions(),
            make_mesh((1, 1, 1), devices=jax.devices()[:1]),
        )


def test_decoding_skips_the_adapter_outside_the_range(adapted):
    """One token at a time (decode) takes the plain adapter path: a layer outside lora.layers branches
    around the adapter's matmuls (lax.cond), so the latency suite sees what skipping layers buys."""
    from flax import nnx

    model, _ = adapted
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda st, t: nnx.merge(graphdef, st)(t))(state, jnp.asarray(TOKENS[:1, :1])))
    assert "cond[" in jaxpr
