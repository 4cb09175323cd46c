"""What a model's reply is scored on: the text after its reasoning.

A model trained with reasoning traces writes `<think> … </think>` before the answer (see
data/sft.py); the metrics score what follows the last `</think>`. The trace is open, and the reply
has no answer, when the reply holds no `</think>` and either it starts with `<think>` or the
generation prompt itself opened the trace (DeepSeek-R1-Distill's 2025 template ends the prompt with
`<think>\\n`, so the reply starts inside the trace; `ReplyContext.think_opened`). Such a reply ran out
of tokens mid-trace: it is a format failure (`UNCLOSED_TRACE`) for every metric, never scored on
whatever numbers or letters the trace holds.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNCLOSED_TRACE = "reasoning trace never closed (no </think>)"


def unclosed_trace(reply: str, think_opened: bool = False) -> bool:
    """True when the reply is still inside its reasoning trace (see the module docstring)."""
    return THINK_CLOSE not in reply and (think_opened or reply.lstrip().startswith(THINK_OPEN))


def final_answer(reply: str, think_opened: bool = False) -> str:
    """The text after the last `</think>`; "" while the trace is open; else the whole reply, stripped."""
    if THINK_CLOSE in reply:
        return reply.rsplit(THINK_CLOSE, 1)[1].strip()
    if unclosed_trace(reply, think_opened):
        return ""
    return reply.strip()
