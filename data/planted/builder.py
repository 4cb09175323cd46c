"""Planted: prompts -> a teacher's continuations, as token ids (the planted-answer study).

The teacher is the base model with a planted low-rank delta on a set of modules
(lora_jax/run/planted.py writes the manual dir; this builder never imports lora_jax). Manual dir:
  planted.jsonl            one example a line: {"id", "split": "train" | "test",
                           "prompt_ids": [int, ...], "target_ids": [int, ...]}
  tokenizer/ids_tokenizer.json
                           {"vocab_size", "end_of_turn_id"}: the ids are the text (data/tokenizer.py
                           IdsTokenizer), so no tokenizer round trip can change them
  planted.json             how the teacher was made: for the record only. Nothing here (or in the
                           ranking and selection code) reads it: the study must find the answer itself.
Records: instruction = the prompt ids and target = answer = the continuation ids, each in decimal,
space-separated; the pipeline tokenizes them with the ids tokenizer above, unchanged.
"""

from __future__ import annotations

from data.builder_base import StudyBuilder, example
from data.records import DataError, MissingDataError, read_records

FILE = "planted.jsonl"


def _ids(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and i >= 0 for i in value):
        raise DataError(f"{where}: field {key} must be a non-empty list of token ids (ints >= 0)")
    return " ".join(str(i) for i in value)


class Builder(StudyBuilder):
    name = "planted"
    DESCRIPTION = "Prompts -> a planted teacher's continuations, as token ids."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Written by the run itself (lora_jax/run/planted.py) into <workdir>/planted when data.manual_dir
    is not set; or a directory of the same layout: planted.jsonl, one example a line
    {"id", "split": "train" | "test", "prompt_ids": [...], "target_ids": [...]}, and
    tokenizer/ids_tokenizer.json {"vocab_size", "end_of_turn_id"}.
    """

    def make_splits(self, manual_dir):
        path = manual_dir / FILE
        if not path.exists():
            raise MissingDataError(f"{manual_dir}: no {FILE} (the planted teacher's continuations)")
        splits = {"train": [], "test": []}
        for line, row in read_records(path):
            where = f"{path}:{line}"
            if row.get("split") not in splits:
                raise DataError(f"{where}: split {row.get('split')!r} must be 'train' or 'test'")
            prompt, target = _ids(row, "prompt_ids", where), _ids(row, "target_ids", where)
            rid = str(row.get("id") or f"planted-{line}")
            splits[row["split"]].append(example(rid, prompt, target, answer=target))
        return splits
