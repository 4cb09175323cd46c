"""KV-cache decoding: prefill a prompt, then one token per step (greedy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.model.transformer import Transformer


def forward_with_cache(model: Transformer, tokens, positions, segment_ids, cache):
    """Runs tokens [batch, time] through the model, writing their k/v into the cache.

    Returns (float32 logits [batch, time, vocab], new cache). Prefill is a call with the whole
    (left-padded, segment 0 on padding) prompt; each decode step a call with time = 1.
    """
    h, cache = model.hidden_states(tokens, positions, segment_ids, cache=cache)
    return model.logits_from_hidden(h), cache


def greedy_generate(model: Transformer, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id: int | None = None):
    """Greedy decoding of a left-padded prompt batch.

    prompt_tokens, prompt_mask: [batch, prompt_len] (mask 1 on real tokens, 0 on left padding).
    Returns generated ids [batch, max_new_tokens]; after EOS a row repeats EOS.
    """
    b, t = prompt_tokens.shape
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = init_cache(model, b, t + max_new_tokens)
    logits, cache = forward_with_cache(model, prompt_tokens, positions, mask, cache)
    next_tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    next_pos = positions[:, -1] + 1
    done = jnp.zeros((b,), bool)

    def step(carry, _):
        tok, pos, cache, done = carry
        if eos_id is not None:
            done = done | (tok == eos_id)
        logits, cache = forward_with_cache(model, tok[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
        return (nxt, pos + 1, cache, done), tok

    _, out = jax.lax.scan(step, (next_tok, next_pos, cache, done), None, length=max_new_tokens)
    return out.T
