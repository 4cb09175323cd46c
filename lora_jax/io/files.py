"""Atomic file writes: a file appears whole under its name or not at all (written under a temporary
name, then renamed into place). The project's one way to write a file others read."""

from __future__ import annotations

import contextlib
import os

from etils import epath


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renamed to `path` when the block succeeds, removed if not."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """Writes a text file under a temporary name, then renames it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
