"""CoCoHD: congressional hearing transcripts (>20K tokens) -> a JSON summary (JSON key/value match).

Target JSON schema (an object; the instruction names exactly these keys):
  required: title (str), congress (str), chamber ("House" | "Senate" | "Joint"), committee (str),
            held_date (str), members_present (list[str]), witnesses (list[str]);
  optional: topic (str), outcomes (list[str]).
A target missing a required key, or with a value of the wrong type, is dropped and counted; keys
outside the schema are removed (counted), so the model is never trained to write keys it was not
asked for and the key/value metric scores only what the instruction asks.

Two upstream layouts:
  - cocohd.jsonl: one hearing a line {id | govinfo_id, transcript, target, optional split};
  - the CoCoHD transcripts as the Hugging Face dataset stores them (`data/CHRG-<congress>/CHRG-*.txt`,
    any depth) with targets from `targets.jsonl` ({govinfo_id, target}) or, for hearings it lacks,
    from the hearing-details table (`hearing_details.parquet` / `.jsonl`: govinfo_id, title,
    chamber, committee, held_date, members, witnesses; congress comes from the CHRG id).
"""

from __future__ import annotations

import json
import re

from data.builder_base import StudyBuilder, example, select, split_off
from data.records import DataError, MissingDataError, read_records

REQUIRED = {
    "title": str,
    "congress": str,
    "chamber": str,
    "committee": str,
    "held_date": str,
    "members_present": list,
    "witnesses": list,
}
OPTIONAL = {"topic": str, "outcomes": list}
CHAMBERS = ("House", "Senate", "Joint")
INSTRUCTION = (
    "Read the congressional hearing transcript and return a JSON object with the keys title, congress, "
    "chamber (House, Senate or Joint), committee, held_date, members_present (a list) and witnesses "
    "(a list), plus topic and outcomes (a list) when the transcript states them."
)
TARGET_KEYS = ("target", "summary", "target_json", "target_json_rule_derived")
DETAILS_FILES = ("hearing_details.parquet", "hearing_details.jsonl", "CoCoHD_hearing_details_cleaned.parquet")
_TAG = re.compile(r"</?(html|title|body|pre)>", re.IGNORECASE)
_CHRG = re.compile(r"^CHRG-(\d+)")


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


def schema_problem(target: dict) -> str | None:
    """None when `target` satisfies the schema, else "missing_keys" or "bad_values"."""
    if any(k not in target or target[k] in (None, "") for k in REQUIRED):
        return "missing_keys"
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        value = target.get(key)
        if value is None and key in OPTIONAL:
            continue
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            return "bad_values"
    return None if target["chamber"] in CHAMBERS else "bad_values"


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in re.split(r"[;\n]", value) if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def target_from_details(row: dict) -> dict:
    """A schema target from one hearing-details row (names as the CoCoHD table has them)."""
    m = _CHRG.match(str(row.get("govinfo_id", "")))
    chamber = str(row.get("chamber") or "").strip().title()
    target = {
        "title": str(row.get("title") or "").strip(),
        "congress": m.group(1) if m else str(row.get("congress") or ""),
        "chamber": chamber,
        "committee": str(row.get("committee") or "").strip(),
        "held_date": str(row.get("held_date") or "").strip(),
        "members_present": _as_list(row.get("members")),
        "witnesses": _as_list(row.get("witnesses")),
    }
    return {k: v for k, v in target.items() if v not in ("", [])}


def find_transcripts(manual_dir) -> list:
    """Every CHRG-*.txt under manual_dir, at any depth, sorted by path."""
    return sorted(
        root / n for root, _, names in manual_dir.walk() for n in names if n.startswith("CHRG-") and n.endswith(".txt")
    )


class Builder(StudyBuilder):
    name = "cocohd"
    SPLIT_SIZES = {"train": 732, "test": 1053}
    DESCRIPTION = "CoCoHD hearings -> JSON summaries."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir either
      cocohd.jsonl, one hearing per line: {"id" or "govinfo_id", "transcript": full GovInfo CHRG text,
        "target": the JSON summary (object or JSON string; schema in data/cocohd/builder.py),
        optional "split": "train" | "test"}; or
      the CoCoHD transcripts as downloaded from the Hugging Face dataset of CoCoHD transcripts
        (https://huggingface.co/datasets/gtfintechlab/CoCoHD: data/CHRG-<congress>/CHRG-*.txt), with
        targets.jsonl ({"govinfo_id", "target"}) and/or hearing_details.parquet (the hearing-details
        table, gtfintechlab/CoCoHD_hearing_details_cleaned) beside them.
    Without "split" fields, 732 train / 1053 test rows are drawn with a fixed seed.
    """

    def _example(self, rid, transcript: str, target: dict, where: str):
        """The example, or None when the target fails the schema (counted)."""
        problem = schema_problem(target)
        if problem:
            self.counts[f"dropped_target_{problem}"] += 1
            return None
        extra = sorted(set(target) - set(REQUIRED) - set(OPTIONAL))
        self.counts["target_keys_removed"] += len(extra)
        target = {k: target[k] for k in (*REQUIRED, *OPTIONAL) if k in target}
        text = json.dumps(target, ensure_ascii=False)
        return example(rid, INSTRUCTION, text, _TAG.sub("", transcript).strip(), answer=text)

    def _jsonl_rows(self, path):
        rows, given = [], {}
        for line, row in read_records(path):
            where = f"{path}:{line}"
            if "transcript" not in row:
                raise DataError(f"{where}: missing field transcript")
            rid = row.get("id") or row.get("govinfo_id") or f"cocohd-{line}"
            if row.get("split") is not None and row["split"] not in ("train", "test"):
                raise DataError(f"{where}: split {row['split']!r} must be 'train' or 'test'")
            ex = self._example(rid, row["transcript"], target_json(row, where), where)
            if ex is None:
                continue
            if row.get("split") is not None:
                given.setdefault(row["split"], []).append(ex)
            rows.append(ex)
        return rows, given

    def _transcript_rows(self, manual_dir, transcripts):
        targets = {}
        for name in DETAILS_FILES:
            if (manual_dir / name).exists():
                for line, row in read_records(manual_dir / name):
                    if row.get("govinfo_id"):
                        targets[str(row["govinfo_id"])] = target_from_details(row)
        if (manual_dir / "targets.jsonl").exists():
            path = manual_dir / "targets.jsonl"
            for line, row in read_records(path):
                if not row.get("govinfo_id"):
                    raise DataError(f"{path}:{line}: missing field govinfo_id")
                targets[str(row["govinfo_id"])] = target_json(row, f"{path}:{line}")
        if not targets:
            raise MissingDataError(
                f"{manual_dir}: transcripts found but no targets; expected targets.jsonl or one of {', '.join(DETAILS_FILES)}"
            )
        rows = []
        for path in transcripts:
            rid = path.stem
            if rid not in targets:
                self.counts["dropped_no_target"] += 1
                continue
            ex = self._example(rid, path.read_bytes().decode("utf-8", errors="replace"), targets[rid], str(path))
            if ex is not None:
                rows.append(ex)
        return rows, {}

    def make_splits(self, manual_dir):
        self.counts.update(
            dropped_target_missing_keys=0, dropped_target_bad_values=0, dropped_no_target=0, target_keys_removed=0
        )
        jsonl = [manual_dir / n for n in ("cocohd.jsonl", "cocohd.json") if (manual_dir / n).exists()]
        transcripts = [] if jsonl else find_transcripts(manual_dir)
        if jsonl:
            rows, given = self._jsonl_rows(jsonl[0])
        elif transcripts:
            rows, given = self._transcript_rows(manual_dir, transcripts)
        else:
            raise MissingDataError(
                f"{manual_dir}: no CoCoHD file; expected one of cocohd.jsonl, cocohd.json, or CHRG-*.txt transcripts"
            )
        if given:
            return {"train": given.get("train", []), "test": given.get("test", [])}
        n_test = min(self.SPLIT_SIZES["test"], len(rows) // 2) or 1
        train, test = split_off(rows, n_test, self.SEED)
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
