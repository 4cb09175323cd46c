"""Scoring a suite: a completion function's replies, the suite's metric on every one.

`eval/` never builds models: it receives `complete(records, suite) -> [Completion or None]`, built by
the orchestrator from the generation code (lora_jax/run/eval_hooks.py, `completion_fn`), which renders
prompts exactly as training renders the generation prompt. A `Completion` is the prompt's length in
tokens, the reply, and whether the prompt itself opened a `<think>` trace (then the reply starts
inside it; a plain `(prompt_tokens, reply)` pair means it did not). None means the prompt could not
fit the context even with its document cut as training cuts it: the example is dropped and counted
(`dropped_prompt_too_long`), never a crash mid-suite.

Each reply is scored as `metric(reply, reference, context)` with the record's `ReplyContext`: the
question's options read back from the record's instruction (data/mcq_options.py; {} for a prompt
that lists none) and the completion's `think_opened`. A reply whose reasoning trace never closed
scores 0 as a format failure under every metric (eval/answer_text.py). A reference the metric cannot
read (empty, not the JSON it must be, no field to score) raises ValueError in the metric: it is
counted (`bad_references`) and left out of the mean. Any other exception is a bug and propagates.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from data.mcq_options import parse_option_lines
from data.sft import record_text
from eval.answer_text import UNCLOSED_TRACE, unclosed_trace
from eval.metrics import METRICS, aggregate
from eval.scored import ReplyContext, Scored
from eval.suites import Suite


class Completion(NamedTuple):
    prompt_tokens: int
    reply: str
    think_opened: bool = False  # the prompt ended inside an opened <think>: the reply starts in the trace


def reply_context(record: dict, completion: Completion) -> ReplyContext:
    """What a metric knows beside the reply (eval/scored.py), from the record and its completion."""
    return ReplyContext(
        options=parse_option_lines(record_text(record, "instruction")), think_opened=completion.think_opened
    )


def run_suite(records: list, suite: Suite, complete: Callable[[list, Suite], list[Completion | None]]) -> dict:
    """-> {"score", "num_examples", "format_failures", "bad_references", "dropped_prompt_too_long",
    "examples": [{"id", "prediction", "reference", "score", ...}]}."""
    metric = METRICS[suite.metric]
    replies = complete(records, suite)
    scores, examples, bad, dropped = [], [], 0, 0
    for record, completion in zip(records, replies, strict=True):
        if completion is None:
            dropped += 1
            continue
        completion = Completion(*completion)
        reply = completion.reply
        reference = record_text(record, "answer")
        row = {
            "id": record_text(record, "id"),
            "prompt_tokens": completion.prompt_tokens,
            "prediction": reply,
            "reference": reference,
        }
        context = reply_context(record, completion)
        try:
            if not reference.strip():
                raise ValueError("empty reference")
            s = metric(reply, reference, context)
        except ValueError as e:  # a reference the metric cannot read: counted, left out of the mean
            bad += 1
            examples.append(dict(row, score=None, bad_reference=str(e)))
            continue
        if unclosed_trace(reply, context.think_opened):  # one rule for every metric
            s = Scored(0.0, UNCLOSED_TRACE)
        scores.append(s)
        examples.append(dict(row, score=s.score, format_failure=s.format_failure, details=s.details))
    result = aggregate(scores, bad_references=bad)
    result.update(dropped_prompt_too_long=dropped, examples=examples)
    return result
