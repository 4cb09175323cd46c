"""GovReport RougeLsum: Google's `rouge-score` package, `rougeLsum` with the Porter stemmer, F-measure.

RougeLsum is the union-LCS over sentences, and rouge-score finds sentences at newlines. Both the
summary and the reference are first split into sentences, one per line, by `split_sentences`: at
existing line breaks, then after `.`, `!` or `?` followed by whitespace and an upper-case letter,
digit or opening quote/bracket. It needs no downloaded data (rouge-score's own splitter needs
NLTK's punkt). An empty summary scores 0 and is a format failure.
"""

from __future__ import annotations

import functools
import re

from eval.answer_text import final_answer
from eval.scored import Scored

_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> str:
    """Text -> its sentences, one per line."""
    lines = (s.strip() for line in text.splitlines() for s in _BOUNDARY.split(line))
    return "\n".join(s for s in lines if s)


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)


def score(reply: str, reference: str) -> Scored:
    summary = final_answer(reply)
    if not summary:
        return Scored(0.0, "empty summary")
    s = _scorer().score(split_sentences(reference), split_sentences(summary))["rougeLsum"]
    return Scored(float(s.fmeasure), details={"precision": float(s.precision), "recall": float(s.recall)})
