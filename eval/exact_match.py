"""LLaVA-CoT exact match of the normalised `<CONCLUSION>` content.

Definition: the reply's conclusion is the text inside its last `<CONCLUSION>…</CONCLUSION>` (no
such tags: a format failure, score 0). Both conclusions are normalised: markdown emphasis (`*`,
`_`) removed, NFKC, case-folded, punctuation and whitespace collapsed (`**B**` -> `b`). They match
when equal; when the reference is a single option letter, a reply conclusion that starts with that
letter as an option (`B`, `B: 5 MPa`, `(B) 5 MPa`) matches too.
"""

from __future__ import annotations

import re

from data.records import normalize_text
from eval.answer_text import final_answer
from eval.scored import Scored

_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.DOTALL)
_OPTION = re.compile(r"^\(?([A-Za-z])(?:\)|[.:]|\s|$)")


def conclusion(text: str) -> str | None:
    found = _CONCLUSION.findall(text)
    return found[-1].strip() if found else None


def normal(text: str) -> str:
    return normalize_text(re.sub(r"[*_]", "", text))


def score(reply: str, reference: str) -> Scored:
    pred = conclusion(final_answer(reply))
    if pred is None:
        return Scored(0.0, "no <CONCLUSION> tags")
    ref = conclusion(reference)
    ref = normal(ref if ref is not None else reference)
    got = normal(pred)
    if got == ref:
        return Scored(1.0)
    if len(ref) == 1 and ref.isalpha():
        m = _OPTION.match(re.sub(r"[*_]", "", pred).strip())
        return Scored(float(bool(m) and m.group(1).casefold() == ref), details={"parsed": got})
    return Scored(0.0, details={"parsed": got})
