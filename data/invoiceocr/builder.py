"""Invoice OCR: invoice image -> JSON (Donut `gt_parse`: header, items, summary), JSON key/value match.

Layouts: `metadata.jsonl` image folders (one, or train/ + test|validation/), or the Parquet files of
katanaml-org/invoices-donut-data-v1 as the hub stores them (`data/{train,validation,test}-*.parquet`,
rows {image: {bytes, path}, ground_truth}); the hub's validation split is not used.
"""

from __future__ import annotations

import json

from data.builder_base import StudyBuilder, example, select, split_off
from data.records import DataError, MissingDataError, read_records

INSTRUCTION = "Extract the invoice as a JSON object with the keys header, items and summary."


def ground_truth(row: dict, where: str) -> dict:
    gt = row.get("ground_truth")
    if gt is None:
        raise DataError(f"{where}: missing field ground_truth")
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: ground_truth is not valid JSON ({e.msg})") from None
    parse = gt.get("gt_parse") if isinstance(gt, dict) else None
    if not isinstance(parse, dict):
        raise DataError(f"{where}: ground_truth has no gt_parse object")
    return parse


class Builder(StudyBuilder):
    name = "invoiceocr"
    SPLIT_SIZES = {"train": 1400, "test": 447}
    DESCRIPTION = "Invoice OCR to JSON (Donut format)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir the Donut-format invoice dataset: the repository
    https://huggingface.co/datasets/katanaml-org/invoices-donut-data-v1 as downloaded (data/train-*.parquet,
    data/test-*.parquet), or image folders: train/metadata.jsonl and test/metadata.jsonl (or one
    metadata.jsonl), rows {file_name, ground_truth: "{\\"gt_parse\\": {header, items, summary}}"}, with the
    images beside them.
    """

    def _read(self, folder):
        path = folder / "metadata.jsonl"
        rows = []
        for line, row in read_records(path):
            where = f"{path}:{line}"
            if not row.get("file_name"):
                raise DataError(f"{where}: missing field file_name")
            target = json.dumps(ground_truth(row, where), ensure_ascii=False)
            image = self.read_image(folder, row["file_name"], where)
            if image is None:
                continue
            rows.append(
                example(f"{folder.name}/{row['file_name']}", INSTRUCTION, target, answer=target, images=[image])
            )
        return rows

    def _read_parquet(self, path):
        rows = []
        for line, row in read_records(path):
            where = f"{path}:{line}"
            image = row.get("image")
            data = image.get("bytes") if isinstance(image, dict) else image
            target = json.dumps(ground_truth(row, where), ensure_ascii=False)
            checked = self.image_bytes(data, where)
            if checked is not None:
                rows.append(example(f"{path.stem}/{line}", INSTRUCTION, target, answer=target, images=[checked]))
        return rows

    def make_splits(self, manual_dir):
        self.counts["dropped_bad_images"] = 0
        hub = {s: sorted(manual_dir.glob(f"data/{s}-*.parquet")) for s in ("train", "test")}
        if hub["train"] or hub["test"]:
            if not (hub["train"] and hub["test"]):
                raise MissingDataError(f"{manual_dir}/data: expected both train-*.parquet and test-*.parquet")
            train = [r for p in hub["train"] for r in self._read_parquet(p)]
            test = [r for p in hub["test"] for r in self._read_parquet(p)]
        elif (manual_dir / "train" / "metadata.jsonl").exists():
            train = self._read(manual_dir / "train")
            test_dir = next(
                (manual_dir / d for d in ("test", "validation") if (manual_dir / d / "metadata.jsonl").exists()), None
            )
            if test_dir is None:
                raise DataError(f"{manual_dir}: train/metadata.jsonl found but no test/metadata.jsonl")
            test = self._read(test_dir)
        elif (manual_dir / "metadata.jsonl").exists():
            rows = self._read(manual_dir)
            n_test = min(self.SPLIT_SIZES["test"], max(len(rows) // 5, 1))
            train, test = split_off(rows, n_test, self.SEED)
        else:
            raise MissingDataError(f"{manual_dir}: no metadata.jsonl (or train/metadata.jsonl)")
        return {
            "train": select(train, self.SPLIT_SIZES["train"], self.SEED),
            "test": select(test, self.SPLIT_SIZES["test"], self.SEED),
        }
