"""Reading a JSON object out of a model's reply, and normalising values for comparison.

`parse_object`: the answer text (after any `</think>`) is parsed as JSON; failing that, the inside
of a ```json fence; failing that, the first `{` onwards (text around the object is tolerated).
A reply that holds no JSON object (nothing parseable, or a list, a string, a number) gives None and
the reason, which the metrics count as a format failure.
"""

from __future__ import annotations

import json
import re

from data.records import normalize_text
from eval.answer_text import final_answer

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_object(reply: str) -> tuple[dict | None, str]:
    text = final_answer(reply)
    decoder = json.JSONDecoder()
    whole = _decode(decoder, text, whole=True)
    if whole is not None:  # the reply is one JSON value: it must be the object itself
        return (whole, "") if isinstance(whole, dict) else (None, f"JSON {type(whole).__name__}, not an object")
    candidates = _FENCE.findall(text) + ([text[text.index("{") :]] if "{" in text else [])
    for c in candidates:
        value = _decode(decoder, c, whole=False)
        if isinstance(value, dict):
            return value, ""
    return None, "no parseable JSON"


def _decode(decoder: json.JSONDecoder, text: str, whole: bool):
    text = text.strip()
    try:
        value, end = decoder.raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value if not whole or end == len(text) else None


def normal(value) -> str:
    """A scalar as compared: NFKC, case-folded, punctuation and whitespace collapsed."""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return normalize_text(str(value))


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested JSON -> {"a.b.0.c": leaf}: every leaf under its key path (list items by index)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
