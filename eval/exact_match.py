"""LLaVA-CoT exact match of the normalised `<CONCLUSION>` content.

Definition: the reply's conclusion is the text inside its last `<CONCLUSION>…</CONCLUSION>` (no
such tags: a format failure, score 0). Both conclusions are normalised: markdown emphasis (`*`,
`_`) removed, NFKC, case-folded, punctuation and whitespace collapsed (`**B**` -> `b`). They match
when equal. When the reference conclusion is an option — a single letter, or a letter *marked as an
option*: `B`, `B.`, `B:`, `B)` or `(B)`, alone or followed by option text (`B: 5 MPa`, the real
LLaVA-CoT form) — the letters decide, in both directions: a reply conclusion that is an option
(marked the same way, upper case) matches when its letter is the reference's (reply `B` against
reference `B: 5 MPa`, and reply `B: 5 MPa` against reference `B`). A letter that starts a word or a
sentence is not an option: reference `A` does not match "A cat is on the mat.", reference `I` not
"I think C", and a reference "A cat is on the mat." is text, not option A.
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


def option_letter(text: str) -> str | None:
    """The letter of a conclusion marked as an option (`B`, `B.`, `B:`, `B)`, `(B)`, optionally
    followed by option text; markdown emphasis ignored), else None."""
    m = _OPTION.match(re.sub(r"[*_]", "", text).strip())
    return (m.group("paren") or m.group("mark")) if m else None


def score(reply: str, reference: str, context: ReplyContext | None = None) -> Scored:
    if unclosed_trace(reply, (context or NO_CONTEXT).think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
    pred = conclusion(final_answer(reply))
    if pred is None:
        return Scored(0.0, "no <CONCLUSION> tags")
    ref_text = conclusion(reference)
    ref_text = ref_text if ref_text is not None else reference
    ref, got = normal(ref_text), normal(pred)
    if got == ref:
        return Scored(1.0)
    # a single letter in any case ("b") is an option too; else only a marked upper-case letter
    ref_letter = ref.upper() if len(ref) == 1 and ref.isalpha() else option_letter(ref_text)
    if ref_letter:
        return Scored(float(option_letter(pred) == ref_letter), details={"parsed": got})
    return Scored(0.0, details={"parsed": got})
