"""LLaVA-CoT: image + question -> tagged <SUMMARY>/<CAPTION>/<REASONING>/<CONCLUSION> answer (exact match)."""

from __future__ import annotations

import re

from data.builder_base import StudyBuilder, example, select, split_off
from data.records import DataError, find_file, read_records

_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.DOTALL)


def conclusion(answer: str) -> str:
    m = _CONCLUSION.search(answer)
    return m.group(1).strip() if m else ""


def question_and_answer(row: dict, where: str) -> tuple[str, str]:
    """LLaVA-CoT-100k {conversations: [{from: human, value}, {from: gpt, value}]} or flat {question, llava_cot_output}."""
    if "conversations" in row:
        turns = row["conversations"]
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise DataError(f"{where}: conversations need a 'human' and a 'gpt' turn")
        return human.replace("<image>", "").strip(), gpt.strip()
    if "question" in row and "llava_cot_output" in row:
        return row["question"], row["llava_cot_output"]
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
        rows = []
        for line, row in read_records(path):
            where = f"{path}:{line}"
            if not row.get("image"):
                raise DataError(f"{where}: missing field image")
            question, answer = question_and_answer(row, where)
            image = self.read_image(manual_dir, row["image"], where)
            if image is None:
                continue
            rows.append(
                example(row.get("id", f"llavacot-{line}"), question, answer, answer=conclusion(answer), images=[image])
            )
        n_test = min(self.SPLIT_SIZES["test"], max(len(rows) // 5, 1))
        train, test = split_off(rows, n_test, self.SEED)
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
