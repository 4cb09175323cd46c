"""Minimal safetensors reading by slices (memory-mapped) and streaming writing, one tensor at a time.

The `safetensors` package loads whole tensors (and its numpy backend has no bfloat16); here a
reader returns lazy numpy views so a host touches only the slices it needs, and a writer emits the
header first and then each tensor as it is produced, so no second full copy is ever held. Files
are written to a temporary name and renamed, so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from etils import epath

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = str(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> np.dtype:
        code = self.header[name]["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """A read-only lazy view; slicing it reads only the pages it touches."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self.header[name]["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def write_text_atomic(path, text: str) -> None:
    """Writes a text file under a temporary name, then renames it into place."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


def write_safetensors(
    path: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors named in `specs` (name, shape, dtype), calling `produce(name)` for each in turn."""
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # alignment, as the reference writer does
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in specs:
                arr = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
                if arr.shape != tuple(shape):
                    raise ValueError(f"{path}: tensor {name} has shape {arr.shape}, declared {tuple(shape)}")
                f.write(arr.tobytes())
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
