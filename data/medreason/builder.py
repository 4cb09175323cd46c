"""MedReason: medical reasoning traces (train), evaluated on the shared MedMCQA evaluation split."""

from __future__ import annotations

import re

from data.builder_base import example, select
from data.mcq_options import option_lines
from data.medmcqa.builder import INSTRUCTION, EvaluatedOnMedMCQA, dedup_key
from data.records import DataError, find_file, normalize_text, read_records, require

OPEN_INSTRUCTION = "Answer the following medical question."
FILES = ["medreason.jsonl", "medreason.parquet", "medreason.json", "ours_quality_33000.jsonl"]
_OPTION_LINE = re.compile(r"^\s*([A-J])[.):]\s*(.*\S)\s*$")


def parse_options(options, where: str) -> dict[str, str]:
    """'Answer Choices:\\nA. x\\nB. y' (or a {letter: text} object) -> {letter: text}; {} if open-ended."""
    if isinstance(options, dict):
        return {str(k).strip(): str(v).strip() for k, v in options.items()}
    if not options or not str(options).strip():
        return {}
    parsed = {}
    for line in str(options).splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            parsed[m.group(1)] = m.group(2)
    if not parsed:
        raise DataError(f"{where}: options {str(options)[:60]!r} has no 'A. ...' lines")
    return parsed


def strip_explanation(answer: str) -> str:
    return re.split(r"\.?\s*Explanation:", answer, maxsplit=1)[0].strip()


def match_letter(answer: str, options: dict[str, str]) -> str | None:
    """The letter whose option text equals the answer: exactly first, then normalised. No fuzzy guessing."""
    for letter, text in options.items():
        if text == answer:
            return letter
    norm = normalize_text(answer)
    hits = [letter for letter, text in options.items() if normalize_text(text) == norm]
    return hits[0] if len(hits) == 1 else None


class Builder(EvaluatedOnMedMCQA):
    name = "medreason"
    SPLIT_SIZES = {"train": 31682}
    DESCRIPTION = "MedReason reasoning SFT; test = the MedMCQA evaluation split."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir: the rows of https://huggingface.co/datasets/UCSC-VLAA/MedReason
    ({question, options, answer, reasoning}) as the hub names them (ours_quality_33000.jsonl) or as
    medreason.jsonl (or .parquet/.json), and
    MedMCQA's dev file (dev.json from https://github.com/medmcqa/medmcqa, or validation.jsonl from
    the Hugging Face copy): the evaluation split is built from it exactly as for MedMCQA.
    """

    def make_splits(self, manual_dir):
        test, keys = self.medmcqa_eval(manual_dir)
        # MedMCQA's `exp` is an explanation in another voice, not a MedReason trace: with
        # reasoning_traces=True it would become eval target text the model never learned to write.
        test = [dict(ex, reasoning="") for ex in test]
        path = find_file(manual_dir, FILES, "MedReason")
        train, unmatched, open_ended, overlap = [], 0, 0, 0
        for line, row in read_records(path):
            where = f"{path}:{line}"
            require(row, ["question", "answer"], where)
            options = parse_options(row.get("options"), where)
            if dedup_key(row["question"], options.values()) in keys:
                overlap += 1
                continue
            answer = strip_explanation(str(row["answer"]))
            reasoning = row.get("reasoning") or ""
            rid = row.get("id", f"medreason-{line}")
            if not options:  # open-ended: asked and trained as free text, not as multiple choice
                open_ended += 1
                train.append(example(rid, f"{OPEN_INSTRUCTION}\n\n{row['question']}", answer, reasoning=reasoning))
                continue
            letter = match_letter(answer, options)
            if letter is None:
                unmatched += 1
                continue
            instruction = f"{INSTRUCTION}\n\n{row['question']}\n{option_lines(options)}"
            train.append(example(rid, instruction, f"{letter}. {options[letter]}", reasoning=reasoning, answer=letter))
        self.counts.update(
            train_dropped_unmatched_answer=unmatched,
            train_open_ended=open_ended,
            train_dropped_overlapping_eval=overlap,
        )
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
