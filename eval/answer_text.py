"""What a model's reply is scored on: the text after its reasoning.

A model trained with reasoning traces writes `<think> … </think>` before the answer (see
data/sft.py); the metrics score what follows the last `</think>`. A reply whose think block never
closes (it ran out of tokens) has no answer: the empty string.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def final_answer(reply: str) -> str:
    if THINK_CLOSE in reply:
        return reply.rsplit(THINK_CLOSE, 1)[1].strip()
    if reply.lstrip().startswith(THINK_OPEN):
        return ""
    return reply.strip()
