"""Scoring a model on a suite: prompts as training renders them, batched greedy decoding with the
KV cache, the suite's metric on every reply.

Prompts longer than the context: the document is cut exactly as training cuts it, so prompt +
max_new_tokens fit min(data.max_seq_len, the model's context); a prompt whose instruction alone is
still too long is dropped and counted (`dropped_prompt_too_long`), never a crash mid-suite. A
reference the metric cannot read (e.g. an empty one) is counted (`bad_references`) and left out.
"""

from __future__ import annotations

import dataclasses

from data.sft import SFTOptions, generation_prompt_ids
from data.tokenizer import Tokenizer
from eval.metrics import METRICS, aggregate
from eval.suites import Suite
from lora_jax.generate import GenerationOptions, complete

PAD_MULTIPLE = 64  # prompt lengths are bucketed so that few shapes compile


def _text(record, key: str) -> str:
    value = record.get(key, "")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")


def build_prompts(records, tok: Tokenizer, opts: SFTOptions, suite: Suite, context: int):
    """([(record, prompt ids)], dropped count): prompts cut to fit context - max_new_tokens."""
    opts = dataclasses.replace(opts, max_seq_len=context)
    kept, dropped = [], 0
    for record in records:
        ids = generation_prompt_ids(tok, record, opts, suite.max_new_tokens)
        if len(ids) + suite.max_new_tokens > context:
            dropped += 1
            continue
        kept.append((record, ids))
    return kept, dropped


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    ids = {tok.end_of_turn_id}
    eos = tok.special_tokens.get("eos_token")
    if eos:
        ids.add(tok.token_id(eos))
    return tuple(sorted(ids))


def run_suite(model, tok: Tokenizer, records, suite: Suite, opts: SFTOptions, mesh=None, seed: int = 0) -> dict:
    """-> {"score", "examples", "format_failures", "bad_references", "dropped_prompt_too_long", "per_example"}."""
    context = min(opts.max_seq_len, model.config.max_position_embeddings)
    prompts, dropped = build_prompts(records, tok, opts, suite, context)
    gen = GenerationOptions(
        max_new_tokens=suite.max_new_tokens,
        temperature=suite.temperature,
        stop_ids=stop_ids(tok),
        prefill_chunk=suite.prefill_chunk,
    )
    replies = (
        complete(
            model,
            [ids for _, ids in prompts],
            gen,
            tok.decode,
            stop_strings=suite.stop,
            batch_size=suite.batch_size,
            seed=seed,
            mesh=mesh,
            pad_multiple=PAD_MULTIPLE,
        )
        if prompts
        else []
    )
    metric = METRICS[suite.metric]
    scores, per_example, bad = [], [], 0
    for (record, ids), reply in zip(prompts, replies):
        reference = _text(record, "answer")
        row = {"id": _text(record, "id"), "prompt_tokens": len(ids), "prediction": reply, "reference": reference}
        try:
            if not reference.strip():
                raise ValueError("empty reference")
            s = metric(reply, reference)
        except ValueError as e:  # a reference the metric cannot read: counted, left out of the mean
            bad += 1
            per_example.append(dict(row, score=None, bad_reference=str(e)))
            continue
        scores.append(s)
        per_example.append(dict(row, score=s.score, format_failure=s.format_failure, details=s.details))
    result = aggregate(scores, bad_references=bad)
    result.update(dropped_prompt_too_long=dropped, per_example=per_example)
    return result
