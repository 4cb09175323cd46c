"""The latency suite's model variants (base, unmerged, merged) and its measurement."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import latency
from lora_jax.lora import LoraSpec
from lora_jax.model import RuntimeOptions, Transformer
from tests.tiny_model import TINY

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, size=(2, 12)))


def _adapted():
    model = Transformer(TINY, LoraSpec(targets=("o_proj", "fc2"), rank=4, alpha=8), RuntimeOptions(), rngs=nnx.Rngs(0))
    for t in model.lora.targets:
        b = getattr(model.layers, t).lora_b
        b.set_value(jnp.asarray(np.random.default_rng(1).normal(size=b.get_value().shape), jnp.float32))
    return model


def test_variants_compute_what_they_claim_and_leave_the_model_alone():
    model = _adapted()
    before = np.asarray(model(TOKENS))
    v = latency.variants(model)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), before)  # merging a copy never touches the model
    np.testing.assert_allclose(np.asarray(v["merged"](TOKENS)), before, atol=1e-5)
    plain = Transformer(TINY, None, RuntimeOptions(), rngs=nnx.Rngs(0))  # the same seed: the same base weights
    np.testing.assert_allclose(np.asarray(v["base"](TOKENS)), np.asarray(plain(TOKENS)), atol=1e-6)
    assert not np.allclose(np.asarray(v["base"](TOKENS)), before, atol=1e-3)


def test_measure_reports_percentiles_per_variant():
    result = latency.measure(_adapted(), batch=1, prompt_len=8, new_tokens=4, requests=3, warmup=1)
    assert set(result) == {"base", "unmerged", "merged"}
    for stats in result.values():
        assert stats["requests"] == 3 and 0 < stats["tpot_ms_p50"] <= stats["tpot_ms_p95"]
        assert 0 < stats["ttft_ms_p50"] <= stats["ttft_ms_p95"]
