"""Packing SFT examples into fixed-length rows: segment_ids numbered from 1, positions restarting."""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((n, seq_len), np.int32),
        "targets": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }


def write_row(rows: dict, r: int, examples: list[dict]) -> None:
    """Writes examples one after another into row r (zeros = padding beyond them)."""
    t = 0
    for seg, ex in enumerate(examples, start=1):
        n = len(ex["tokens"])
        for key in ("tokens", "targets", "loss_mask"):
            rows[key][r, t : t + n] = ex[key]
        rows["segment_ids"][r, t : t + n] = seg
        rows["positions"][r, t : t + n] = np.arange(n)
        t += n


def write_pixels(pixels: np.ndarray, r: int, examples: list[dict]) -> None:
    """The row's images into pixels[r] ([rows, images per row, H, W, 3])."""
    images = [p for ex in examples for p in ex.get("pixels", ())]
    if len(images) > pixels.shape[1]:
        raise ValueError(f"a row holds {len(images)} images; at most {pixels.shape[1]} per row")
    for i, image in enumerate(images):
        pixels[r, i] = image
