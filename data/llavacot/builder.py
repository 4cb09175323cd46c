"""LLaVA-CoT: image + question -> tagged <SUMMARY>/<CAPTION>/<REASONING>/<CONCLUSION> answer (exact match).

Upstream is ~100k rows and ~171 GB of images, so rows are sampled first from the text alone and only
the kept rows' images are read, one at a time while tfds writes them: memory does not grow with the
size of the manual dir. A multi-turn conversation keeps its first human/gpt exchange (the schema has
one target); the later turns are counted (`multi_turn_rows`, `dropped_extra_turns`), never silently lost.

The test split is held out by image, not by row: upstream asks several questions about one image, and
a row-wise draw put such an image in both splits (the model trained on the picture it is tested on).
Images (their `image` path as the record writes it) are ranked by a seeded hash of the path alone, and
taken whole, all their rows, into the test split in that order until it holds the test size
(min(SPLIT_SIZES["test"], rows // 5)); the remaining images' rows are the training pool, sampled to
SPLIT_SIZES["train"]. The dataset info counts images in both written splits: `images_in_both_splits`
(this rule: 0) and `images_in_both_splits_by_row_rule` (what the earlier row-wise draw would write).
Two paths to one picture are two images here: identity is the path, since reading every image to
compare contents would read all of upstream's images.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

import tensorflow_datasets as tfds

from data.builder_base import LazyRows, StudyBuilder, example, select, split_off
from data.records import DataError, find_file, read_records

_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.DOTALL)


def conclusion(answer: str) -> str:
    m = _CONCLUSION.search(answer)
    return m.group(1).strip() if m else ""


def question_and_answer(row: dict, where: str) -> tuple[str, str, int]:
    """(question, answer, extra human/gpt exchanges after the first) of a LLaVA-CoT-100k row
    {conversations: [{from: human, value}, {from: gpt, value}, ...]} or a flat {question, llava_cot_output}."""
    if "conversations" in row:
        turns = row["conversations"]
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise DataError(f"{where}: conversations need a 'human' and a 'gpt' turn")
        extra = max(sum(t.get("from") == "gpt" for t in turns) - 1, 0)
        return human.replace("<image>", "").strip(), gpt.strip(), extra
    if "question" in row and "llava_cot_output" in row:
        return row["question"], row["llava_cot_output"], 0
    raise DataError(f"{where}: expected 'conversations' (LLaVA-CoT-100k) or question/llava_cot_output")


def image_key(name: str) -> str:
    """An image's identity for the split: its relative path as written, normalised (`./a/b.png` = `a/b.png`)."""
    return posixpath.normpath(name.replace("\\", "/"))


def split_off_by_image(stubs: list[dict], n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) of stubs {id, line, image}, every image's rows on one side, test about n_test rows.

    Images are ranked by sha256(f"{seed}:{image}") (an order that depends on each image alone, stable
    across runs and machines) and join the test split in that order with all their rows; an image whose
    rows would take the split past n_test is skipped, so the split ends at n_test rows when images with
    few rows remain. When no image fits, the test split is the smallest image (first in rank on ties).
    """
    by_image: dict[str, list[dict]] = {}
    for stub in stubs:
        by_image.setdefault(stub["image"], []).append(stub)
    ranked = sorted(by_image, key=lambda im: hashlib.sha256(f"{seed}:{im}".encode()).digest())
    test_images, n = set(), 0
    for im in ranked:
        if n >= n_test:
            break
        if n + len(by_image[im]) <= n_test:
            test_images.add(im)
            n += len(by_image[im])
    if not test_images and ranked:
        test_images.add(min(ranked, key=lambda im: len(by_image[im])))  # min keeps the first on ties
    return [s for s in stubs if s["image"] not in test_images], [s for s in stubs if s["image"] in test_images]


def images_in_both(train: list[dict], test: list[dict]) -> int:
    """The number of distinct images with rows in both train and test."""
    return len({s["image"] for s in train} & {s["image"] for s in test})


class Builder(StudyBuilder):
    name = "llavacot"
    SPLIT_SIZES = {"train": 10000, "test": 270}
    # 1.1.0: the test split is held out by image; a dataset prepared by 1.0.0 (by row) is rebuilt, not reused
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Test split held out by image (1.0.0 drew rows, leaking shared images)."}
    DESCRIPTION = "LLaVA-CoT structured visual reasoning."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir: train.jsonl from https://huggingface.co/datasets/Xkev/LLaVA-CoT-100k (rows
    {id, image, conversations}) and the images it names, at those relative paths (unpack image.zip.part-*
    into data.manual_dir).
    """

    def make_splits(self, manual_dir):
        path = find_file(manual_dir, ["train.jsonl", "llava_cot.jsonl", "train.json"], "LLaVA-CoT")
        stubs, multi, extra = [], 0, 0
        for line, row in read_records(path):  # pass 1: text only, checked, kept as (id, line, image)
            where = f"{path}:{line}"
            image = row.get("image")
            if image is None or image == "":
                raise DataError(f"{where}: missing field image")
            if not isinstance(image, str):
                raise DataError(f"{where}: image file name must be a non-empty string, got {image!r}")
            _, _, n = question_and_answer(row, where)
            multi, extra = multi + (n > 0), extra + n
            stubs.append({"id": str(row.get("id", f"llavacot-{line}")), "line": line, "image": image_key(image)})
        if len({s["image"] for s in stubs}) == 1:
            raise DataError(
                f"{path}: all {len(stubs)} rows show one image; the test split is held out by image, "
                "so it needs rows of at least 2 images"
            )
        n_test = min(self.SPLIT_SIZES["test"], max(len(stubs) // 5, 1))
        train, test = split_off_by_image(stubs, n_test, self.SEED)
        train = select(train, self.SPLIT_SIZES["train"], self.SEED)
        # What the earlier rule (a seeded draw of n_test rows) would have written, for the record.
        row_train, row_test = split_off(stubs, n_test, self.SEED)
        row_train = select(row_train, self.SPLIT_SIZES["train"], self.SEED)
        self.counts.update(
            multi_turn_rows=multi,
            dropped_extra_turns=extra,
            dropped_bad_images=0,
            images_in_both_splits=images_in_both(train, test),
            images_in_both_splits_by_row_rule=images_in_both(row_train, row_test),
        )
        return {name: self._lazy(path, manual_dir, rows) for name, rows in (("train", train), ("test", test))}

    def _lazy(self, path, manual_dir, stubs) -> LazyRows:
        """Pass 2: the kept lines, read again in file order; each one's image is read as it is written."""
        lines = {s["line"] for s in stubs}

        def produce():
            for line, row in read_records(path):
                if line not in lines:
                    continue
                where = f"{path}:{line}"
                question, answer, _ = question_and_answer(row, where)
                image = self.read_image(manual_dir, row["image"], where)
                yield (
                    None
                    if image is None
                    else example(
                        row.get("id", f"llavacot-{line}"), question, answer, answer=conclusion(answer), images=[image]
                    )
                )

        return LazyRows(len(stubs), produce)
