"""Safetensors reading by slices (the `safetensors` package) and streaming writing, one tensor at a time.

Reading: `safe_open(...).get_slice` reads only the slices a host needs (bfloat16 included), and
checks at open that the header's offsets fit the file, so a truncated download fails at once with
its path. Writing has no library equivalent: the header goes first and then each tensor as it is
produced, so no second full copy is ever held; files are written to a temporary name and renamed,
so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from lora_jax.errors import CheckpointError
from lora_jax.io.files import atomic_path

_NAMES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_DTYPES = {v: k for k, v in _NAMES.items()}


class SafetensorsFile:
    """The tensors of one .safetensors file, read lazily by slices (memory-mapped by the library)."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._file = safe_open(self.path, "numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({e}); re-download it") from None
        self.metadata = self._file.metadata() or {}
        self._slices = {name: self._file.get_slice(name) for name in self._file.keys()}

    def keys(self) -> list[str]:
        return list(self._slices)

    def dtype(self, name: str) -> np.dtype:
        code = self._slices[name].get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def read(self, name: str, *index: slice) -> np.ndarray:
        """tensor[index] (basic slices, one per leading dimension); only those bytes are read."""
        self.dtype(name)
        return self._slices[name][index] if index else self._file.get_tensor(name)


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
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name} has shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.tobytes())
