"""Agreement with the planted teacher (the planted-answer study, data/planted/).

Reply and reference are token ids written as text (decimal, space-separated: data/tokenizer.py
IdsTokenizer). The reference is the teacher's greedy continuation of the prompt; the reply is the
model's greedy continuation of the same prompt.

Definition: score = (number of positions i < len(reference) where reply[i] == reference[i]) /
len(reference). A reply shorter than the reference misses the positions it lacks; tokens after the
reference's end are not scored (the teacher stopped there: its end-of-turn or its budget). 1 means
the teacher's continuation exactly. Higher is better. A reply that is not token ids is a format
failure (score 0); a reference that is not token ids raises ValueError (a bad reference).
"""

from __future__ import annotations

from eval.scored import NO_CONTEXT, ReplyContext, Scored

NOT_IDS = "not token ids"


def _ids(text: str) -> list[int] | None:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        return None


def score(reply: str, reference: str, context: ReplyContext | None = NO_CONTEXT) -> Scored:
    ref = _ids(reference)
    if not ref:
        raise ValueError(f"reference {reference[:40]!r} is not a non-empty list of token ids")
    got = _ids(reply)
    if got is None:
        return Scored(0.0, NOT_IDS)
    matched = sum(a == b for a, b in zip(got, ref))
    first_miss = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return Scored(matched / len(ref), details={"matched": matched, "tokens": len(ref), "prefix": first_miss})
