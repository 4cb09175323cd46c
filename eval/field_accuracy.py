"""Invoice OCR field accuracy over flattened key paths.

Definition: the reference and the reply's object (`json_reply.parse_object`) are flattened to
{key path: leaf} (`header.invoice_no`, `items.0.item_desc`, …); the score is the fraction of the
reference's paths whose leaf in the reply equals it after normalisation (`json_reply.normal`). A
missing path counts as wrong; extra paths in the reply are ignored. No JSON object, or a reasoning
trace that never closed (eval/answer_text.py): 0, a format failure. A reference with no leaf to score
(not a non-empty object, or only empty containers: `{"items": []}`) cannot be scored: ValueError (the
suite counts it as a bad reference and leaves it out of the mean).
"""

from __future__ import annotations

from eval.answer_text import UNCLOSED_TRACE, unclosed_trace
from eval.json_match import reference_object
from eval.json_reply import flatten, normal, parse_object
from eval.scored import NO_CONTEXT, ReplyContext, Scored


def score(reply: str, reference, context: ReplyContext | None = None) -> Scored:
    ref = flatten(reference_object(reference))
    if not ref:
        raise ValueError("reference has no fields to score (only empty lists or objects)")
    if unclosed_trace(reply, (context or NO_CONTEXT).think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
    pred, why = parse_object(reply)
    if pred is None:
        return Scored(0.0, why)
    got = flatten(pred)
    right = sum(path in got and normal(got[path]) == normal(leaf) for path, leaf in ref.items())
    return Scored(right / len(ref), details={"fields": len(ref), "right": right})
