"""Scoring a suite: a completion function's replies, the suite's metric on every one.

`eval/` never builds models: it receives `complete(records, suite) -> [(prompt_tokens, reply) or
None]`, built by the orchestrator from the generation code (lora_jax/evaluate.py,
`completion_fn`), which renders prompts exactly as training renders the generation prompt. None
means the prompt could not fit the context even with its document cut as training cuts it: the
example is dropped and counted (`dropped_prompt_too_long`), never a crash mid-suite. A reference
the metric cannot read (empty, or not the JSON it must be) is counted (`bad_references`) and left
out of the mean.
"""

from __future__ import annotations

from typing import Callable

from data.sft import record_text
from eval.metrics import METRICS, aggregate
from eval.suites import Suite

Completion = tuple[int, str] | None  # (prompt tokens, reply text), or None: the prompt cannot fit


def run_suite(records: list, suite: Suite, complete: Callable[[list, Suite], list[Completion]]) -> dict:
    """-> {"score", "num_examples", "format_failures", "bad_references", "dropped_prompt_too_long",
    "examples": [{"id", "prediction", "reference", "score", ...}]}."""
    metric = METRICS[suite.metric]
    replies = complete(records, suite)
    scores, examples, bad, dropped = [], [], 0, 0
    for record, completion in zip(records, replies, strict=True):
        if completion is None:
            dropped += 1
            continue
        prompt_tokens, reply = completion
        reference = record_text(record, "answer")
        row = {
            "id": record_text(record, "id"),
            "prompt_tokens": prompt_tokens,
            "prediction": reply,
            "reference": reference,
        }
        try:
            if not reference.strip():
                raise ValueError("empty reference")
            s = metric(reply, reference)
        except ValueError as e:  # a reference the metric cannot read: counted, left out of the mean
            bad += 1
            examples.append(dict(row, score=None, bad_reference=str(e)))
            continue
        scores.append(s)
        examples.append(dict(row, score=s.score, format_failure=s.format_failure, details=s.details))
    result = aggregate(scores, bad_references=bad)
    result.update(dropped_prompt_too_long=dropped, examples=examples)
    return result
