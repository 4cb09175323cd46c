"""CoCoHD averaged key and value match rate.

Definition, per example, with R the reference object and P the object read from the reply
(`json_reply.parse_object`):
  key rate   = |keys(R) ∩ keys(P)| / |keys(R)|;
  value rate = mean, over the reference keys present in P, of the value match: strings (and
               numbers) compared after normalisation (`json_reply.normal`) -> 1 or 0; lists by set
               overlap of their normalised items, |A ∩ B| / |A ∪ B| (1 when both are empty); objects
               by equality of their normalised JSON. 0 when no reference key is present.
  score      = (key rate + value rate) / 2.
A reply with no JSON object, or whose reasoning trace never closed (eval/answer_text.py), scores 0
and is a format failure. A reference that is not a non-empty object cannot be scored: ValueError
(the suite counts it as a bad reference and leaves it out).
"""

from __future__ import annotations

import json

from eval.answer_text import UNCLOSED_TRACE, unclosed_trace
from eval.json_reply import normal, parse_object
from eval.scored import NO_CONTEXT, ReplyContext, Scored


def value_match(pred, ref) -> float:
    if isinstance(ref, list):
        if not isinstance(pred, list):
            pred = [pred]
        a, b = {normal(v) for v in pred}, {normal(v) for v in ref}
        return 1.0 if not (a or b) else len(a & b) / len(a | b)
    return float(normal(pred) == normal(ref))


def reference_object(reference) -> dict:
    try:
        ref = json.loads(reference) if isinstance(reference, str) else reference
    except json.JSONDecodeError as e:
        raise ValueError(f"reference is not valid JSON ({e.msg})") from None
    if not isinstance(ref, dict) or not ref:
        raise ValueError("reference is not a non-empty JSON object")
    return ref


def score(reply: str, reference, context: ReplyContext | None = None) -> Scored:
    ref = reference_object(reference)
    if unclosed_trace(reply, (context or NO_CONTEXT).think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
    pred, why = parse_object(reply)
    if pred is None:
        return Scored(0.0, why)
    present = [k for k in ref if k in pred]
    key_rate = len(present) / len(ref)
    value_rate = sum(value_match(pred[k], ref[k]) for k in present) / len(present) if present else 0.0
    return Scored((key_rate + value_rate) / 2, details={"key_rate": key_rate, "value_rate": value_rate})
