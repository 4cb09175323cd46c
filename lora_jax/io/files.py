"""Atomic file writes: the project's one way to write a text file (tmp name + rename)."""

from __future__ import annotations
import json
import os
import struct
from typing import Callable, Iterable
import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open
from lora_jax.errors import CheckpointError


def write_text_atomic(path, text: str) -> None:
    """Writes a text file under a temporary name, then renames it into place."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)
