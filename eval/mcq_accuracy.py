"""MedMCQA / MedReason accuracy with a strict parser: the letter counts only in the asked form.

The prompt asks for "the letter of the correct option" and training targets read "C. <option text>".
Accepted (on the first non-empty line of the answer, after any `</think>`): the reply *starts* with
one of the question's option letters, upper case, either in parentheses — `(C)` — or followed by
".", ")", ":" or the end of the line — `C`, `C.`, `C. 11 mm`, `C)` — optionally after "Answer:" /
"The answer is" (then also followed by a space or comma: `Answer: C because …`). A bare letter
followed by a space is not accepted without that prefix ("A 45-year-old …", "I think …" are prose).
Everything else is wrong *and* a format failure, counted apart from wrong letters:
  - no letter at the start ("I think it is C", the option text without its letter, an empty reply);
  - a second letter offered on that line, after "or", "and", ",", "/" or "&" ("A. or C.", "B) and D)",
    "A/C"); a capital inside option text ("C. Vitamin D") is not a second letter.
"""

from __future__ import annotations

import re

from eval.answer_text import final_answer
from eval.scored import Scored

_LEAD = re.compile(
    r"^(?P<prefix>(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*:?\s*)?"
    r"(?:\((?P<paren>[A-J])\)|(?P<mark>[A-J])(?=[.):]|$)|(?P<word>[A-J])(?=[\s,;]))",
    re.IGNORECASE,
)
_ALTERNATIVE = re.compile(r"(?:\bor\b|\band\b|[,/&])\s*\(?([A-J])\b")


def parse_letter(reply: str, letters: str = "ABCD") -> tuple[str | None, str]:
    """(letter, "") when the reply states one of `letters` in the accepted form, else (None, why)."""
    lines = [line.strip() for line in final_answer(reply).splitlines() if line.strip()]
    if not lines:
        return None, "empty answer"
    m = _LEAD.match(lines[0])
    letter = m and (m.group("paren") or m.group("mark") or (m.group("prefix") and m.group("word")))
    if not letter or not letter.isupper() or letter not in letters:
        return None, "no option letter at the start"
    marked = set(_ALTERNATIVE.findall(lines[0])) | {letter}
    if len(marked) > 1:
        return None, f"several letters ({', '.join(sorted(marked))})"
    return letter, ""


def score(reply: str, gold_letter: str, letters: str = "ABCD") -> Scored:
    letter, why = parse_letter(reply, letters)
    if letter is None:
        return Scored(0.0, why)
    return Scored(float(letter == gold_letter.strip().upper()), details={"parsed": letter})
