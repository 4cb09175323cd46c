"""Generation with the KV cache against full recomputation, chunked prefill, sampling, stops, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lora_jax.errors import ConfigError
from lora_jax.lora.spec import LoraSpec
from lora_jax.model.transformer import RuntimeOptions, Transformer, merge_lora
from lora_jax.serve.generate import GenerationOptions, complete, generate, left_pad
from lora_jax.sharding import make_mesh, shard_model
from tests.tiny_model import TINY

CFG = dataclasses.replace(TINY, max_position_embeddings=128)
PROMPTS = [[5, 9, 2, 33, 7, 1, 40], [11, 3], [8, 8, 19, 22]]  # different lengths


def adapted_model(targets=("o_proj", "fc2"), options=RuntimeOptions()):
    model = Transformer(CFG, LoraSpec(targets=targets, rank=4, alpha=8), options, rngs=nnx.Rngs(0))
    for t in targets:  # B != 0, so the adapters change the tokens
        b = getattr(model.layers, t).lora_b
        b.set_value(jnp.asarray(np.random.default_rng(1).normal(size=b.get_value().shape), jnp.float32))
    return model


@nnx.jit
def _full_logits(model, tokens):
    return model(tokens)


def full_recompute_greedy(model, prompt, n, length=32):
    """Step-by-step argmax over the whole sequence, no cache: the reference. The sequence is right-padded
    to one length (causal: padding after a position never changes its logits), so it compiles once."""
    seq = list(prompt)
    for _ in range(n):
        logits = _full_logits(model, jnp.asarray([seq + [0] * (length - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("with_adapters", [False, True])
def test_cached_greedy_equals_full_recomputation(with_adapters):
    model = adapted_model() if with_adapters else Transformer(CFG, None, rngs=nnx.Rngs(0))
    tokens, mask = left_pad(PROMPTS)
    out, lengths = generate(model, tokens, mask, GenerationOptions(max_new_tokens=6))
    assert list(lengths) == [6, 6, 6]
    for row, prompt in enumerate(PROMPTS):
        assert list(out[row]) == full_recompute_greedy(model, prompt, 6), row
    base = Transformer(CFG, None, rngs=nnx.Rngs(0))
    if with_adapters:  # the adapters matter, and merged decodes the same tokens as unmerged
        assert not np.array_equal(out, generate(base, tokens, mask, GenerationOptions(max_new_tokens=6))[0])
        merge_lora(model)
        np.testing.assert_array_equal(generate(model, tokens, mask, GenerationOptions(max_new_tokens=6))[0], out)


def test_chunked_prefill_equals_one_shot():
    from lora_jax.serve.generate import init_cache
    from tests.tiny_model import forward_with_cache

    model = adapted_model()
    tokens, mask = left_pad(PROMPTS, multiple=4)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    one, _ = forward_with_cache(model, tokens, positions, mask, init_cache(model, 3, 16))
    cache, chunks = init_cache(model, 3, 16), []
    for s in range(0, tokens.shape[1], 4):
        logits, cache = forward_with_cache(
            model, tokens[:, s : s + 4], positions[:, s : s + 4], mask[:, s : s + 4], cache
        )
        chunks.append(logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], np.asarray(one)[real], atol=1e-5)
    a = generate(model, tokens, mask, GenerationOptions(max_new_tokens=5))[0]
    b = generate(model, tokens, mask, GenerationOptions(max_new_tokens=5, prefill_chunk=4))[0]
    np.testing.assert_array_equal(a, b)


def test_a_32k_prompt_prefills_in_bounded_memory():
    """32,768 prompt tokens on a tiny model, chunked prefill + chunked attention: the compiled program's
    temporaries stay far below the [T, T] score matrix (4 GiB in float32 for one head)."""
    cfg = dataclasses.replace(CFG, max_position_embeddings=32768 + 8)
    model = Transformer(cfg, None, RuntimeOptions(attention_impl="chunked"), rngs=nnx.Rngs(0))
    t = 32768
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, t)), jnp.int32)
    mask = jnp.ones((1, t), jnp.int32)
    opts = GenerationOptions(max_new_tokens=4, prefill_chunk=1024)
    from lora_jax.serve.generate import _compiled

    graphdef, state = nnx.split(model)
    compiled = _compiled(graphdef, opts, None).lower(state, tokens, mask, jax.random.key(0), None, None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < t * t * 4 / 64, temp  # < 64 MiB, vs 4 GiB for one [T, T] float32 score matrix
    out, lengths = compiled(state, tokens, mask, jax.random.key(0), None, None)  # generate's program, run
    assert out.shape == (1, 4) and int(lengths[0]) == 4


def test_sampling_is_reproducible_and_temperature_0_is_greedy():
    model = adapted_model()
    tokens, mask = left_pad(PROMPTS)
    greedy = generate(model, tokens, mask, GenerationOptions(max_new_tokens=8))[0]
    hot = GenerationOptions(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.9)
    a, b = generate(model, tokens, mask, hot, seed=3)[0], generate(model, tokens, mask, hot, seed=3)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, generate(model, tokens, mask, hot, seed=4)[0])
    assert not np.array_equal(a, greedy)
    cold = GenerationOptions(max_new_tokens=8, temperature=0.0, top_k=20, top_p=0.9)
    np.testing.assert_array_equal(generate(model, tokens, mask, cold, seed=9)[0], greedy)
    top1 = GenerationOptions(max_new_tokens=8, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(generate(model, tokens, mask, top1, seed=5)[0], greedy)


def test_rows_stop_at_stop_ids_and_nothing_after_is_returned():
    model = adapted_model()
    tokens, mask = left_pad(PROMPTS)
    free = generate(model, tokens, mask, GenerationOptions(max_new_tokens=8))[0]
    # A token some row first emits after step 0 (else row 0's first token).
    firsts = [(r, i) for r in range(3) for i in range(1, 8) if free[r, i] not in free[r, :i]]
    r, k = firsts[0] if firsts else (0, 0)
    stop_id = int(free[r, k])
    opts = GenerationOptions(max_new_tokens=8, stop_ids=(stop_id,))
    out, lengths = generate(model, tokens, mask, opts)
    assert lengths[r] == k + 1 and list(out[r, : k + 1]) == list(free[r, : k + 1]) and not out[r, k + 1 :].any()
    for row in range(3):
        hits = np.nonzero(free[row] == stop_id)[0]
        assert lengths[row] == (hits[0] + 1 if len(hits) else 8)
    texts = complete(model, PROMPTS, opts, lambda ids: " ".join(map(str, ids)), batch_size=2)
    assert texts[r] == " ".join(map(str, free[r, :k]))  # the stop id itself is not returned
    cut = complete(
        model,
        PROMPTS,
        GenerationOptions(max_new_tokens=8),
        lambda ids: " ".join(map(str, ids)),
        stop_strings=[f" {free[1, 1]}"],
        batch_size=2,
    )
    assert cut[1] == " ".join(map(str, free[1, :8])).split(f" {free[1, 1]}")[0]  # nothing from the stop string on


def test_early_exit_when_every_row_stopped():
    """The loop ends once all rows stopped: a huge max_new_tokens costs nothing more."""
    model = adapted_model()
    tokens, mask = left_pad(PROMPTS)
    free = generate(model, tokens, mask, GenerationOptions(max_new_tokens=4))[0]
    stops = tuple(int(free[r, 0]) for r in range(3))  # every row stops at its first token
    out, lengths = generate(model, tokens, mask, GenerationOptions(max_new_tokens=100, stop_ids=stops))
    assert list(lengths) == [1, 1, 1] and not out[:, 1:].any()


def test_mesh_2x2x2_decodes_the_same_tokens():
    model = adapted_model(options=RuntimeOptions(attention_impl="chunked"))
    tokens, mask = left_pad(PROMPTS + [[4, 4, 4]])
    ref = generate(model, tokens, mask, GenerationOptions(max_new_tokens=6))[0]
    mesh = make_mesh((2, 2, 2))
    shard_model(model, mesh)
    out = generate(model, tokens, mask, GenerationOptions(max_new_tokens=6, cache_dtype="float32"), mesh=mesh)[0]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    "prompt_len,max_new,message",
    [(129, 1, "prompt of 129 tokens is longer than the model's context"), (100, 40, "max_new_tokens=40 after a 100")],
)
def test_requests_that_do_not_fit_are_refused(prompt_len, max_new, message):
    model = Transformer(CFG, None, rngs=nnx.Rngs(0))
    tokens = np.ones((1, prompt_len), np.int32)
    with pytest.raises(ConfigError, match=message):
        generate(model, tokens, tokens, GenerationOptions(max_new_tokens=max_new))


def test_empty_prompt_and_bad_options_are_refused():
    model = Transformer(CFG, None, rngs=nnx.Rngs(0))
    tokens, mask = left_pad([[1, 2], []])
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(model, tokens, mask, GenerationOptions(max_new_tokens=2))
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationOptions(max_new_tokens=2, top_p=0.0)


def test_stepper_decodes_the_same_tokens_as_generate():
    model = adapted_model()
    tokens, mask = left_pad(PROMPTS)
    ref = generate(model, tokens, mask, GenerationOptions(max_new_tokens=5))[0]
    from lora_jax.serve.generate import Stepper

    stepper = Stepper(model, GenerationOptions(max_new_tokens=5), 3, tokens.shape[1])
    out = [np.asarray(stepper.prefill(tokens, mask))] + [np.asarray(stepper.step()) for _ in range(4)]
    np.testing.assert_array_equal(np.stack(out, axis=1), ref)
