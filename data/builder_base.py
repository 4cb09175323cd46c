"""The shared tfds builder: every study dataset reads a manual dir and writes one common schema.

Features (all text as bytes on read-back):
  id, instruction (never truncated), document (long context; the only part truncation may cut),
  target (the assistant answer), reasoning (optional trace), answer (gold for scoring),
  images (encoded image bytes; decoding belongs to the multimodal pipeline).
tfds writes into an `incomplete.*` folder and renames it when done, so an interrupted or failed
preparation never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data import images
from data.records import DataError

TEXT_FIELDS = ("id", "instruction", "document", "target", "reasoning", "answer")


def features() -> tfds.features.FeaturesDict:
    spec: dict[str, Any] = {k: tfds.features.Text() for k in TEXT_FIELDS}
    spec["images"] = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    return tfds.features.FeaturesDict(spec)


def example(id, instruction, target, document="", reasoning="", answer="", images=()) -> dict:
    return {
        "id": str(id),
        "instruction": instruction,
        "document": document or "",
        "target": target,
        "reasoning": reasoning or "",
        "answer": answer if answer is not None else "",
        "images": list(images),
    }


def select(rows: list, n: int | None, seed: int) -> list:
    """A seeded subset of n rows (all rows, in order, when there are not more than n)."""
    if n is None or len(rows) <= n:
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[i] for i in keep]


def split_off(rows: list, n_test: int, seed: int) -> tuple[list, list]:
    """(train, test): a seeded sample of n_test rows held out for testing, the rest for training."""
    test_ids = {r["id"] for r in select(rows, n_test, seed)}
    return [r for r in rows if r["id"] not in test_ids], [r for r in rows if r["id"] in test_ids]


class LazyRows:
    """A split whose rows are made while tfds writes them (`produce()` yields examples, or None for a
    row dropped on the way, e.g. a bad image), so image bytes are read one row at a time and never
    all held at once; its length, known up front, is the number of rows to produce."""

    def __init__(self, n: int, produce):
        self.n, self.produce = n, produce

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return self.produce()


class StudyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Subclasses set SPLIT_SIZES and implement `make_splits(manual_dir) -> {split: [example, ...]}`."""

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_SIZES: dict[str, int] = {}
    SEED = 20260101
    DESCRIPTION = ""

    def __init__(self, *args, bad_images: str = "error", **kwargs):
        """bad_images: "error" (stop at the first undecodable image, naming it) | "drop" (drop and count)."""
        if bad_images not in images.BAD_IMAGE_POLICIES:
            raise DataError(f"data.bad_images={bad_images!r} is unknown; valid: {', '.join(images.BAD_IMAGE_POLICIES)}")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(*args, **kwargs)
        self.bad_images = bad_images
        self.counts: dict[str, int] = {}

    # tfds prints these two lines on stdout at every log level; a run prints its own data lines, so
    # here they go to the log (main.py --verbose shows it).
    def _log_download_bytes(self) -> None:
        logging.info("preparing %s in %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("prepared %s in %s", self.name, self.data_dir)

    def read_image(self, folder, name, where: str) -> bytes | None:
        """The decode-checked image bytes, or None when it is bad and bad_images="drop" (counted)."""
        return self._checked(lambda: images.read_image(folder, name, where))

    def image_bytes(self, data, where: str) -> bytes | None:
        """Image bytes stored inline (Parquet), decode-checked like read_image."""

        def check():
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise DataError(f"{where}: image has no bytes")
            images.check_image(bytes(data), f"{where}: image")
            return bytes(data)

        return self._checked(check)

    def _checked(self, read) -> bytes | None:
        try:
            return read()
        except DataError:
            if self.bad_images == "error":
                raise
            self.counts["dropped_bad_images"] = self.counts.get("dropped_bad_images", 0) + 1
            self._record_counts()
            return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features(),
            metadata=tfds.core.MetadataDict(),
        )

    def make_splits(self, manual_dir: epath.Path) -> dict[str, list[dict]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        manual_dir = epath.Path(dl_manager._manual_dir)  # noqa: SLF001 — checked before tfds asserts
        splits = self.make_splits(manual_dir)
        for name, rows in splits.items():
            if not rows:
                raise DataError(f"{manual_dir}: split {name!r} of {self.name} is empty after parsing and filtering")
        self._record_counts()
        return {name: self._generate_examples(name, rows, manual_dir) for name, rows in splits.items()}

    def _record_counts(self):
        """Into the dataset info (tfds writes it after generation, so counts made while writing land too)."""
        for key, value in self.counts.items():
            self.info.metadata[key] = value
            logging.info("%s: %s = %d", self.name, key, value)

    def _generate_examples(self, split, rows, manual_dir):
        seen = set()
        for row in rows:
            if row is None:  # dropped while being made (counted by whoever dropped it)
                continue
            key = row["id"]
            while key in seen:  # tfds needs unique keys; upstream ids are not always unique
                key = key + "+"
            seen.add(key)
            yield key, row
        if not seen:
            raise DataError(f"{manual_dir}: split {split!r} of {self.name} is empty after parsing and filtering")
        self._record_counts()
