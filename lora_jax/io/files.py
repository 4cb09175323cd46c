"""Atomic file writes: the project's one way to write a text file (tmp name + rename)."""

from __future__ import annotations

import os

from etils import epath


def write_text_atomic(path, text: str) -> None:
    """Writes a text file under a temporary name, then renames it into place."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)
