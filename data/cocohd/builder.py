"""CoCoHD: congressional hearing transcripts (>20K tokens) -> a JSON summary (JSON key/value match).

Target JSON schema (an object; keys the study scores by key/value match):
  title (str), congress (str), chamber ("House" | "Senate" | "Joint"), committee (str),
  held_date (str), members_present (list[str]), witnesses (list[str]), topic (str, optional),
  outcomes (list[str], optional). Other keys are kept as given.
"""

from __future__ import annotations

import json
import re

from data.builder_base import StudyBuilder, example, select, split_off
from data.records import DataError, find_file, read_records

INSTRUCTION = (
    "Read the congressional hearing transcript and return a JSON object with the keys title, congress, "
    "chamber, committee, held_date, members_present, witnesses, topic and outcomes."
)
TARGET_KEYS = ("target", "summary", "target_json", "target_json_rule_derived")
_TAG = re.compile(r"</?(html|title|body|pre)>", re.IGNORECASE)


def target_json(row: dict, where: str) -> dict:
    for key in TARGET_KEYS:
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: field {key} is not valid JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{where}: field {key} must be a JSON object")
            return value
    raise DataError(f"{where}: no target field (expected one of {', '.join(TARGET_KEYS)})")


class Builder(StudyBuilder):
    name = "cocohd"
    SPLIT_SIZES = {"train": 732, "test": 1053}
    DESCRIPTION = "CoCoHD hearings -> JSON summaries."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir: cocohd.jsonl, one hearing per line:
      {"id" or "govinfo_id", "transcript": full GovInfo CHRG text, "target": the JSON summary (object or
       JSON string; see the schema in data/cocohd/builder.py), optional "split": "train" | "test"}.
    Transcripts come from https://github.com/gtfintechlab/CoCoHD (GovInfo CHRG collection).
    Without "split" fields, 732 train / 1053 test rows are drawn with a fixed seed.
    """

    def make_splits(self, manual_dir):
        path = find_file(manual_dir, ["cocohd.jsonl", "cocohd.json"], "CoCoHD")
        rows, given = [], {}
        for line, row in read_records(path):
            where = f"{path}:{line}"
            if "transcript" not in row:
                raise DataError(f"{where}: missing field transcript")
            target = json.dumps(target_json(row, where), ensure_ascii=False)
            rid = row.get("id") or row.get("govinfo_id") or f"cocohd-{line}"
            ex = example(rid, INSTRUCTION, target, _TAG.sub("", row["transcript"]).strip(), answer=target)
            if row.get("split") is not None:
                if row["split"] not in ("train", "test"):
                    raise DataError(f"{where}: split {row['split']!r} must be 'train' or 'test'")
                given.setdefault(row["split"], []).append(ex)
            rows.append(ex)
        if given:
            return {"train": given.get("train", []), "test": given.get("test", [])}
        n_test = min(self.SPLIT_SIZES["test"], len(rows) // 2) or 1
        train, test = split_off(rows, n_test, self.SEED)
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
