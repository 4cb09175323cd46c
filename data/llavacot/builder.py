"""LLaVA-CoT: image + question -> tagged <SUMMARY>/<CAPTION>/<REASONING>/<CONCLUSION> answer (exact match).

Upstream is ~100k rows and ~171 GB of images, so rows are sampled first from the text alone and only
the kept rows' images are read, one at a time while tfds writes them: memory does not grow with the
size of the manual dir. A multi-turn conversation keeps its first human/gpt exchange (the schema has
one target); the later turns are counted (`multi_turn_rows`, `dropped_extra_turns`), never silently lost.
"""

from __future__ import annotations

import re

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


class Builder(StudyBuilder):
    name = "llavacot"
    SPLIT_SIZES = {"train": 10000, "test": 270}
    DESCRIPTION = "LLaVA-CoT structured visual reasoning."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir: train.jsonl from https://huggingface.co/datasets/Xkev/LLaVA-CoT-100k (rows
    {id, image, conversations}) and the images it names, at those relative paths (unpack image.zip.part-*
    into data.manual_dir).
    """

    def make_splits(self, manual_dir):
        path = find_file(manual_dir, ["train.jsonl", "llava_cot.jsonl", "train.json"], "LLaVA-CoT")
        stubs, multi, extra = [], 0, 0
        for line, row in read_records(path):  # pass 1: text only, checked, kept as (id, line)
            where = f"{path}:{line}"
            if not row.get("image"):
                raise DataError(f"{where}: missing field image")
            _, _, n = question_and_answer(row, where)
            multi, extra = multi + (n > 0), extra + n
            stubs.append({"id": str(row.get("id", f"llavacot-{line}")), "line": line})
        self.counts.update(multi_turn_rows=multi, dropped_extra_turns=extra, dropped_bad_images=0)
        n_test = min(self.SPLIT_SIZES["test"], max(len(stubs) // 5, 1))
        train, test = split_off(stubs, n_test, self.SEED)
        train = select(train, self.SPLIT_SIZES["train"], self.SEED)
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
