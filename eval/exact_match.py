"""LLaVA-CoT exact match of the normalised `<CONCLUSION>` content.

Definition: the reply's conclusion is the text inside its last `<CONCLUSION>…</CONCLUSION>` (no
such tags: a format failure, score 0). Both conclusions are normalised: markdown emphasis (`*`,
`_`) removed, NFKC, case-folded, punctuation and whitespace collapsed (`**B**` -> `b`). They match
when equal; when the reference is a single option letter, a reply conclusion that starts with that
letter, upper case, *marked as an option* — `B`, `B.`, `B:`, `B)` or `(B)`, alone or followed by
option text (`B: 5 MPa`, `(B) 5 MPa`) — matches too. A letter that starts a word or a sentence is not
an option: reference `A` does not match "A cat is on the mat.", reference `I` not "I think C".
A reply whose reasoning trace never closed (eval/answer_text.py) is a format failure.
"""

from __future__ import annotations

import re

from data.records import normalize_text
from eval.answer_text import UNCLOSED_TRACE, final_answer, unclosed_trace
from eval.scored import NO_CONTEXT, ReplyContext, Scored

_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.DOTALL)
_OPTION = re.compile(r"^(?:\((?P<paren>[A-Z])\)|(?P<mark>[A-Z])(?:[.:)]|$))")  # (B), B, B., B:, B)


def conclusion(text: str) -> str | None:
    found = _CONCLUSION.findall(text)
    return found[-1].strip() if found else None


def normal(text: str) -> str:
    return normalize_text(re.sub(r"[*_]", "", text))


def score(reply: str, reference: str, context: ReplyContext | None = None) -> Scored:
    if unclosed_trace(reply, (context or NO_CONTEXT).think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
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
        letter = m and (m.group("paren") or m.group("mark"))
        return Scored(float(bool(letter) and letter.casefold() == ref), details={"parsed": got})
    return Scored(0.0, details={"parsed": got})
