"""Reading upstream record files (JSONL, JSON arrays, Parquet) with errors that name file and line."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Iterator

from etils import epath


class DataError(ValueError):
    """Bad input data: the message names the file (and line or key) and what was expected."""


class MissingDataError(DataError, FileNotFoundError):
    """An input file or directory that does not exist."""


def read_records(path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line_or_row_number, record). JSONL (also named .json), a JSON array, or Parquet."""
    path = epath.Path(path)
    if not path.exists():
        raise MissingDataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:  # read in batches: image columns can be larger than memory
            batches = pq.ParquetFile(str(path)).iter_batches(batch_size=64)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    i += 1
                    yield i, row
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: unreadable Parquet file ({' '.join(str(e).split())})") from None
        return
    if path.suffix == ".json":
        with path.open() as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            yield from _json_array(path)
            return
    with path.open() as f:  # JSON lines, streamed: a file larger than memory is fine
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def _json_array(path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: element {i} is not a JSON object")
        yield i, row


def require(row: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def normalize_text(text: str) -> str:
    """For de-duplication and answer matching: NFKC, casefold, punctuation and whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def find_file(manual_dir, candidates, what: str):
    """The first of `candidates` (names, or glob patterns such as the hub's `data/train-*.parquet`)
    present in manual_dir; FileNotFoundError listing them otherwise."""
    manual_dir = epath.Path(manual_dir)
    for name in candidates:
        if "*" in name:
            hits = sorted(manual_dir.glob(name))
            if len(hits) > 1:
                raise DataError(f"{manual_dir}: {len(hits)} files match {name}; expected one")
            if hits:
                return hits[0]
        elif (manual_dir / name).exists():
            return manual_dir / name
    raise MissingDataError(f"{manual_dir}: no {what} file; expected one of {', '.join(candidates)}")
