"""The metric registry: name -> score(reply, reference, context) -> Scored, and the aggregate of a suite.

`context` (eval/scored.py `ReplyContext`) is what the suite knows beside the reply: the question's
options and whether the prompt opened a `<think>` trace."""

from __future__ import annotations

from typing import Callable

from eval import exact_match, field_accuracy, finqa_accuracy, json_match, mcq_accuracy, rouge_lsum, teacher_agreement
from eval.scored import ReplyContext, Scored


def _rouge_lsum(reply: str, reference: str, context: ReplyContext | None = None) -> Scored:
    return rouge_lsum.score(reply, reference)  # an open trace is failed by the suite (eval/generation_suite.py)


METRICS: dict[str, Callable[[str, str, ReplyContext | None], Scored]] = {
    "finqa_accuracy": finqa_accuracy.score,
    "rouge_lsum": _rouge_lsum,
    "mcq_accuracy": mcq_accuracy.score,
    "json_key_value_match": json_match.score,
    "exact_match": exact_match.score,
    "field_accuracy": field_accuracy.score,
    "teacher_agreement": teacher_agreement.score,
}

# Metrics where a lower score is better (e.g. a rate of planted answers): the report ranks them so
# (best arm, Pareto front, relative scores, plots). Every metric not named here: higher is better.
LOWER_IS_BETTER: frozenset[str] = frozenset()


def aggregate(scores: list[Scored], bad_references: int = 0) -> dict:
    """Mean score over the scored examples, with the format failures counted apart."""
    n = len(scores)
    return {
        "score": sum(s.score for s in scores) / n if n else 0.0,
        "num_examples": n,
        "format_failures": sum(bool(s.format_failure) for s in scores),
        "bad_references": bad_references,
    }
