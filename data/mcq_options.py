"""How a multiple-choice prompt lists its options, and reading them back from the prompt.

The MedMCQA and MedReason builders end the instruction with the question's options, one per line,
`A. <text>`, letters in order from A (`option_lines`). The scorer reads them back from the record's
instruction (`parse_option_lines`), so it compares a reply with the option text the model was shown
— nothing is stored beside the record, and datasets prepared before this existed read the same.
"""

from __future__ import annotations

import re
import string
from typing import Mapping

_MARKER = re.compile(r"^([A-Z])\.(?: |$)", re.MULTILINE)


def option_lines(options: Mapping[str, object]) -> str:
    """{letter: text} -> 'A. text' lines (the form the prompt shows)."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def parse_option_lines(text: str) -> dict[str, str]:
    """The options listed at the end of text -> {letter: option text, stripped}.

    The listing is the last run of lines that start `A. `, `B. `, `C. `, … (consecutive letters from
    A, at least two) and runs to the end of text; an option's text runs to the next option's line, so
    it may span lines. {} when text does not end with such a listing (not a multiple-choice prompt)."""
    marks = list(_MARKER.finditer(text))
    for start in range(len(marks) - 1, -1, -1):
        if marks[start].group(1) != "A":
            continue
        run = marks[start:]
        if len(run) < 2 or [m.group(1) for m in run] != list(string.ascii_uppercase[: len(run)]):
            return {}  # the A nearest the end does not begin a clean A, B, C… listing that ends the text
        ends = [m.start() for m in run[1:]] + [len(text)]
        return {m.group(1): text[m.end() : end].strip() for m, end in zip(run, ends)}
    return {}
