"""One example's score, as every metric returns it, and what a metric knows besides the reply.

A metric is `score(reply, reference, context=None) -> Scored` (eval/metrics.py). `ReplyContext` is
built by the suite (eval/generation_suite.py) from the record and its completion:
  - `options`: the question's options {letter: text}, read back from the record's instruction — the
    listing the model was shown (data/mcq_options.py); {} when the prompt lists none;
  - `think_opened`: the generation prompt itself opened a `<think>` block (DeepSeek-R1-Distill's 2025
    template), so the reply starts inside the reasoning trace and has an answer only after `</think>`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scored:
    score: float  # in [0, 1]
    format_failure: str = ""  # why the reply could not be read as the asked form ("" = it could)
    details: dict = dataclasses.field(default_factory=dict)  # metric-specific parts of the score


@dataclasses.dataclass(frozen=True)
class ReplyContext:
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # {letter: option text} or {}
    think_opened: bool = False  # the prompt ended inside an opened <think>: the reply starts in the trace


NO_CONTEXT = ReplyContext()
