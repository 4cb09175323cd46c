"""FinCoT / FinQA accuracy: is the reply's final number the gold number?

Definition. The reply's answer text (after any `</think>`) is searched for the final number: the
first number after the last "answer is" / "answer:" / "\\boxed{", else the last number in the text.
Numbers are parsed, never evaluated: `1,234.5` -> 1234.5, `(12)` -> -12, `-3.4%` -> -3.4,
`$5 million` -> 5 (scale words are units, as FinQA's answers are in the question's units). The
reply is correct when, with p the final number and g the gold number,
  - |p - g| <= 0.0015 * |g| (0.15% relative tolerance; exact when g = 0), or
  - p * 100 or p / 100 meets that tolerance (percent vs fraction), or
  - p rounded to g's written decimals equals g *and* |p - g| <= 0.005 * |g| (g = "0.53" accepts
    0.5312; the 0.5% cap keeps the rounding rule from accepting ±0.5 around an integer gold: g = "2"
    refuses 2.4, g = "3.1" refuses 3.14).
No rule accepts a reply more than 0.5% off the gold, except the x100 / /100 percent forms.
A gold answer "yes"/"no" is matched by the last yes/no word of the reply. A reply with no number
(or no yes/no), or whose reasoning trace never closed (eval/answer_text.py), is wrong and a format
failure.
"""

from __future__ import annotations

import re

from eval.answer_text import UNCLOSED_TRACE, final_answer, unclosed_trace
from eval.scored import NO_CONTEXT, ReplyContext, Scored

TOLERANCE = 0.0015
ROUNDING_CAP = 0.005  # the rounding rule never accepts a reply further than this (relative) from the gold
_NUMBER = re.compile(r"(?<![\w.])(\()?\s*([-\u2212]?)\s*\$?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)\s*(%)?\s*(\))?")
_MARKER = re.compile(r"answer\s*(?:is|:|=)|\\boxed\{", re.IGNORECASE)


def parse_numbers(text: str) -> list[float]:
    """Every number in text, in order, as floats (see the module docstring for the forms)."""
    out = []
    for m in _NUMBER.finditer(text):
        paren_open, minus, digits, _, paren_close = m.groups()
        digits = digits.replace(",", "")
        try:
            value = float(digits)
        except ValueError:
            continue
        if minus or (paren_open and paren_close):
            value = -value
        out.append(value)
    return out


def final_number(reply: str) -> float | None:
    text = final_answer(reply)
    markers = list(_MARKER.finditer(text))
    if markers:
        after = parse_numbers(text[markers[-1].end() :])
        if after:
            return after[0]
    numbers = parse_numbers(text)
    return numbers[-1] if numbers else None


def _decimals(gold: str) -> int | None:
    m = re.search(r"\.(\d+)\s*%?\s*$", gold.strip())
    return len(m.group(1)) if m else (0 if re.search(r"\d\s*%?\s*$", gold.strip()) else None)


def _close(p: float, g: float) -> bool:
    return abs(p - g) <= TOLERANCE * abs(g)


def numbers_match(p: float, gold: str) -> bool:
    g = parse_numbers(gold)[0]
    if _close(p, g) or _close(p * 100, g) or _close(p / 100, g):
        return True
    d = _decimals(gold)
    return d is not None and round(p, d) == round(g, d) and abs(p - g) <= ROUNDING_CAP * abs(g)


def score(reply: str, gold: str, context: ReplyContext | None = None) -> Scored:
    gold = str(gold).strip()
    yes_no = gold.lower() in ("yes", "no")
    if not yes_no and not parse_numbers(gold):
        raise ValueError(f"FinQA gold answer {gold!r} is not a number or yes/no")
    if unclosed_trace(reply, (context or NO_CONTEXT).think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
    if yes_no:
        words = re.findall(r"\b(yes|no)\b", final_answer(reply).lower())
        if not words:
            return Scored(0.0, "no yes/no answer")
        return Scored(float(words[-1] == gold.lower()), details={"parsed": words[-1]})
    p = final_number(reply)
    if p is None:
        return Scored(0.0, "no number in the answer")
    return Scored(float(numbers_match(p, gold)), details={"parsed": p})
