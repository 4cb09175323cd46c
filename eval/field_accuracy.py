"""Invoice OCR field accuracy over flattened key paths.

Definition: the reference and the reply's object (`json_reply.parse_object`) are flattened to
{key path: leaf} (`header.invoice_no`, `items.0.item_desc`, …); the score is the fraction of the
reference's paths whose leaf in the reply equals it after normalisation (`json_reply.normal`). A
missing path counts as wrong; extra paths in the reply are ignored. No JSON object: 0, a format failure.
"""

from __future__ import annotations

from eval.json_match import reference_object
from eval.json_reply import flatten, normal, parse_object
from eval.scored import Scored


def score(reply: str, reference) -> Scored:
    ref = flatten(reference_object(reference))
    pred, why = parse_object(reply)
    if pred is None:
        return Scored(0.0, why)
    got = flatten(pred)
    right = sum(path in got and normal(got[path]) == normal(leaf) for path, leaf in ref.items())
    return Scored(right / len(ref), details={"fields": len(ref), "right": right})
