"""Decisions that every process of a multi-host run must take the same way.

A question about shared storage ("does checkpoints/ exist?", "is the workdir writable?") asked by
each process on its own can get different answers while process 0 is creating things, and the
processes then walk into different collective barriers (orbax's among them) and crash. Here
process 0 answers and broadcasts the answer.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

_MAX_BYTES = 4096


def decided_on_process_0(answer: Callable[[], str]) -> str:
    """Runs `answer` on process 0 only; every process returns its text (UTF-8, ≤ 4 KiB)."""
    text = answer() if jax.process_index() == 0 else ""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = np.zeros(_MAX_BYTES, np.uint8)
    data = text.encode()[:_MAX_BYTES]
    raw[: len(data)] = np.frombuffer(data, np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw != 0]).decode(errors="replace")
