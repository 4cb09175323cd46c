"""MedMCQA / MedReason accuracy with a strict parser: the letter counts only in the asked form.

The prompt asks for "the letter of the correct option" and training targets read "C. <option text>".
Accepted (on the first non-empty line of the answer, after any `</think>`): the reply *starts* with
one of the question's option letters, upper case, either in parentheses — `(C)` — or followed by
".", ")", ":" or the end of the line — `C`, `C.`, `C. 11 mm`, `C)` — optionally after "Answer:" /
"The answer is" (then also followed by a space or comma: `Answer: C because …`). A bare letter
followed by a space is not accepted without that prefix ("A 45-year-old …", "I think …" are prose).
The question's letters and option texts are the record's (`ReplyContext.options`, read back from the
prompt's `A. …` lines by data/mcq_options.py); without options, the letters are A-D.
Everything else is wrong *and* a format failure, counted apart from wrong letters:
  - no letter at the start ("I think it is C", the option text without its letter, an empty reply,
    "A or C", "A/C");
  - a second letter offered on that line, after "or", "and", ",", "/" or "&" ("A. or C.", "B) and D)",
    "A. x or C. y"). Letters inside the chosen option's own text are not offered letters: when the
    text after the letter, compared word by word after normalisation (NFKC, case-folded, punctuation
    dropped), equals that letter's option text or is a prefix of it — "D. Both A and B", "D. Both A"
    for option D "Both A and B" — the reply is that one letter; when it starts with the whole option
    text, only what follows the option text is searched for a second letter. A capital that no
    separator introduces ("C. Vitamin D") is not a second letter either.
  - a reply whose reasoning trace never closed (eval/answer_text.py).
"""

from __future__ import annotations

import re
import unicodedata

from data.records import normalize_text
from eval.answer_text import UNCLOSED_TRACE, final_answer, unclosed_trace
from eval.scored import NO_CONTEXT, ReplyContext, Scored

_LEAD = re.compile(
    r"^(?P<prefix>(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*:?\s*)?"
    r"(?:\((?P<paren>[A-J])\)|(?P<mark>[A-J])(?=[.):]|$)|(?P<word>[A-J])(?=[\s,;]))",
    re.IGNORECASE,
)
_ALTERNATIVE = re.compile(r"(?:\bor\b|\band\b|[,/&])\s*\(?([A-J])\b")
_WORD = re.compile(r"\w+")


def beyond_option_text(rest: str, option: str) -> str:
    """What of `rest` (the line after the letter) may hold a second letter, given the letter's option.

    "" when rest's words equal the option's words or are a prefix of them; the text after the
    option's last word when rest starts with all of them; rest itself otherwise. Words are compared
    as `normalize_text` compares them (NFKC, case-folded, runs of word characters)."""
    rest = unicodedata.normalize("NFKC", rest)
    words = list(_WORD.finditer(rest))
    want = normalize_text(option).split()
    k = 0
    while k < min(len(words), len(want)) and words[k].group().casefold() == want[k]:
        k += 1
    if k == len(words):
        return ""
    if k and k == len(want):
        return rest[words[k - 1].end() :]
    return rest


def parse_letter(reply: str, letters: str = "ABCD", options: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(letter, "") when the reply states one of `letters` in the accepted form, else (None, why).
    `options` ({letter: text}, the question's) lets a reply carry its option's text with the letters in it."""
    lines = [line.strip() for line in final_answer(reply).splitlines() if line.strip()]
    if not lines:
        return None, "empty answer"
    m = _LEAD.match(lines[0])
    letter = m and (m.group("paren") or m.group("mark") or (m.group("prefix") and m.group("word")))
    if not letter or not letter.isupper() or letter not in letters:
        return None, "no option letter at the start"
    rest = lines[0][m.end() :]
    if options and letter in options:
        rest = beyond_option_text(rest, options[letter])
    marked = set(_ALTERNATIVE.findall(rest)) | {letter}
    if len(marked) > 1:
        return None, f"several letters ({', '.join(sorted(marked))})"
    return letter, ""


def score(reply: str, gold_letter: str, context: ReplyContext | None = None, *, letters: str | None = None) -> Scored:
    """1 when the reply states the gold letter in the accepted form; letters default to the context's
    options (A-D without them)."""
    context = context or NO_CONTEXT
    if unclosed_trace(reply, context.think_opened):
        return Scored(0.0, UNCLOSED_TRACE)
    letters = letters or "".join(context.options) or "ABCD"
    letter, why = parse_letter(reply, letters, context.options)
    if letter is None:
        return Scored(0.0, why)
    return Scored(float(letter == gold_letter.strip().upper()), details={"parsed": letter})
