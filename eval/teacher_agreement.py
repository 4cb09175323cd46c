"""Agreement with the planted teacher (the planted-answer study, data/planted/).

Reply and reference are token ids written as text (decimal, space-separated: data/tokenizer.py
IdsTokenizer). The reference is the teacher's greedy continuation of the prompt (its end-of-turn
excluded). The planted suite is teacher-forced (eval/suites.py `teacher_forced`): the reply is, at
each reference position i, the model's most likely next token given the prompt and reference[:i]
(lora_jax/run/eval_hooks.py `teacher_forced_replies`), so every position is scored on the teacher's
own prefix and one early miss does not derail the rest.

Definition: score = (number of positions i < len(reference) where reply[i] == reference[i]) /
len(reference): greedy-token agreement with the teacher, in [0, 1], higher is better (1: the model's
argmax is the teacher's token everywhere). A reply shorter than the reference misses the positions it
lacks; tokens past the reference's end are not scored. A reply that is not token ids is a format
failure (score 0); a reference that is not token ids raises ValueError (a bad reference).
Details: matched, tokens, and first_miss (the first position that disagrees; len(reference) if none).
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
    return Scored(matched / len(ref), details={"matched": matched, "tokens": len(ref), "first_miss": first_miss})
