"""How the torch peers (transformers + PEFT) run in the benchmarks: pinned here, printed by each."""

from __future__ import annotations

import os

# transformers' default attention, and its fastest on CPU (~30% faster than "eager" for PEFT's train
# step on the bench model).
ATTENTION = "sdpa"


def pin_torch(label: str, what: str) -> str:
    """Sets torch's threads to the cores this process may use; returns the line that states the
    peer's settings (label: who the peer is; what: the rest of its setup)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return (
        f"{label}: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"attn_implementation={ATTENTION!r}, {what}"
    )
