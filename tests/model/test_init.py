"""A random base is drawn on the host (lora_jax/model/init.py): the seed decides every weight, an
abstract build has the same shapes and dtypes, and the adapters' fresh values (lora/delta.py) are
the ones jax.random has always drawn for them."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax.lora.delta import init_lora_a, init_lora_tensor
from lora_jax.lora.spec import LoraSpec
from lora_jax.model import init as initial
from lora_jax.model.transformer import RuntimeOptions, Transformer
from tests.tiny_model import TINY

SPEC = LoraSpec(targets=("qkv", "fc2"), rank=4, alpha=8)


def _values(model):
    return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_the_seed_decides_every_weight_and_an_abstract_build_matches_its_shapes():
    a, b = _values(Transformer(TINY, SPEC, rngs=nnx.Rngs(3))), _values(Transformer(TINY, SPEC, rngs=nnx.Rngs(3)))
    other = _values(Transformer(TINY, SPEC, rngs=nnx.Rngs(4)))
    assert a.keys() == b.keys() == other.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    drawn = [k for k in a if "kernel" in k or "embed" in k or "lora_a" in k]
    assert drawn and all(not np.array_equal(a[k], other[k]) for k in drawn)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(TINY, SPEC, rngs=nnx.Rngs(3))))
    for p, v in nnx.to_flat_state(abstract):
        assert (v.get_value().shape, v.get_value().dtype) == (a[str(p)].shape, a[str(p)].dtype), p


def test_draws_have_their_distribution_and_dtype():
    model = Transformer(TINY, SPEC, RuntimeOptions(param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    kernel = model.layers.fc2.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    x = np.asarray(kernel, np.float32)
    assert abs(x.mean()) < 0.002 and 0.018 < x.std() < 0.022  # N(0, 0.02^2) over 2 * 48 * 32 values
    np.testing.assert_array_equal(np.asarray(model.layers.attn_norm.get_value(), np.float32), 1.0)
    np.testing.assert_array_equal(np.asarray(model.layers.qkv.lora_b.get_value()), 0.0)
    a = np.asarray(model.layers.qkv.lora_a.get_value())
    bound = 1 / np.sqrt(TINY.hidden_size)  # PEFT's kaiming-uniform(a=sqrt(5)) over fan_in = hidden
    assert a.dtype == np.float32 and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound


@pytest.mark.parametrize("shape", [(2, 32, 4), (2, 4, 2, 8, 4)])
def test_fresh_adapters_are_the_values_jax_random_has_always_drawn(shape):
    """init_lora_tensor compiles one program per shape with the key as an argument; before, it baked
    the key into a program per call. The values must not move: a run on a checkpoint exports the
    same adapter as before."""
    path, seed = ("layers", "qkv", "lora_a"), 7
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ours = np.asarray(init_lora_tensor(path, shape, seed, sharding, zeros=False))
    key = jax.random.fold_in(jax.random.key(seed), int(hashlib.md5(str(path).encode()).hexdigest()[:7], 16))
    np.testing.assert_array_equal(ours, np.asarray(jax.jit(lambda: init_lora_a(key, shape))()))
    assert initial.DRAW_RULE  # named in the random base's fingerprint (tests/run/test_resume_identity.py)


def test_initializer_range_scales_the_draws_and_names_itself_in_the_fingerprint():
    """model.initializer_range (random init only) is the std of the base's normal draws; at the default
    0.02 the fingerprints are the ones every earlier run recorded, otherwise they name it."""
    import dataclasses

    from flax import nnx

    from configs import base
    from lora_jax.model.transformer import Transformer
    from lora_jax.run.assemble import base_fingerprint
    from tests.tiny_model import TINY

    wide = Transformer(dataclasses.replace(TINY, initializer_range=0.3), None, rngs=nnx.Rngs(0))
    narrow = Transformer(TINY, None, rngs=nnx.Rngs(0))
    ratio = np.asarray(wide.layers.fc2.kernel.get_value()) / np.asarray(narrow.layers.fc2.kernel.get_value())
    np.testing.assert_allclose(ratio, 15.0, rtol=1e-5)  # the same draws, scaled: 0.3 / 0.02
    text, image = base.arm_config("cocohd", "oproj", "runlocal"), base.arm_config("llavacot", "oproj", "runlocal")
    assert base_fingerprint(text) == "random-df65ab1988349890"  # as recorded before the key existed
    assert base_fingerprint(image) == "random-llava-d48344ff03cc05af"
    for config in (text, image):
        default = base_fingerprint(config)
        config.model.initializer_range = 0.3
        assert base_fingerprint(config) != default


def test_the_untied_lm_head_is_stored_vocab_major_with_the_values_it_was_drawn_with():
    """[vocab, embed] as HF stores lm_head.weight (a decode step then reads it contracting its minor
    axis); drawn as the transpose of the [embed, vocab] draw, so a random base keeps its values."""
    import dataclasses

    cfg = dataclasses.replace(TINY, tie_word_embeddings=False)
    model = Transformer(cfg, None, rngs=nnx.Rngs(0))
    head = np.asarray(model.lm_head.get_value())
    assert head.shape == (cfg.vocab_size, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(model.lm_head_weight()), head)
    key, shape = jax.random.key(7), (cfg.hidden_size, cfg.vocab_size)
    drawn = np.asarray(initial.normal(key, shape, jnp.float32, 0.02, transpose=True))
    np.testing.assert_array_equal(drawn, np.asarray(initial.normal(key, shape, jnp.float32, 0.02)).T)
