"""GovReport: long government reports -> summaries (RougeLsum).

Three upstream layouts are read (`find_layout` says which it found):
  - SCROLLS gov_report (`tau/scrolls`): train/validation .jsonl|.json|.parquet, rows {id, input, output};
  - ccdv/govreport-summarization as the Hugging Face hub stores it: `document/{train,validation}/*.parquet`
    (or flat train/validation files), rows {report, summary};
  - the original release (`crs/*.json`, `gao/*.json`, one report per file): CRS files carry
    `reports` (a section tree of `paragraphs`/`subsections`) and `summary` (paragraphs); GAO files
    carry `report` (a list of such sections) and `highlight` (sections whose paragraphs are the
    summary). Sections are joined in order, headings on their own line. The evaluation rows are a
    seeded sample of all reports (the release has no split files of its own).
SCROLLS hides the summaries of its test split, so a `test` file is never used: a validation file is
required, and a row whose summary is empty is an error.
"""

from __future__ import annotations

import json
import logging

from etils import epath

from data.builder_base import StudyBuilder, example, select, split_off
from data.records import DataError, MissingDataError, read_records

INSTRUCTION = "Summarize the following government report."
FLAT = {split: [f"{split}.{ext}" for ext in ("jsonl", "json", "parquet")] for split in ("train", "validation")}


def report_and_summary(row: dict, where: str) -> tuple[str, str]:
    """SCROLLS {id, input, output} or the {report, summary} variant."""
    for doc_key, sum_key in (("input", "output"), ("report", "summary")):
        if doc_key in row and sum_key in row:
            return row[doc_key], row[sum_key]
    raise DataError(f"{where}: expected fields input/output (SCROLLS) or report/summary")


def section_text(node) -> list[str]:
    """Paragraphs of an original-release section tree, depth first, each heading before its text."""
    if isinstance(node, list):
        return [p for child in node for p in section_text(child)]
    if isinstance(node, str):
        return [node] if node.strip() else []
    if not isinstance(node, dict):
        return []
    out = [node["section_title"]] if str(node.get("section_title") or "").strip() else []
    return out + section_text(node.get("paragraphs", [])) + section_text(node.get("subsections", []))


def original_release_row(path: epath.Path) -> tuple[str, str, str]:
    """(id, report, summary) of one crs/ or gao/ JSON file."""
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: expected a JSON object")
    body = row.get("reports", row.get("report"))
    summary = row.get("summary", row.get("highlight"))
    if body is None or summary is None:
        raise DataError(f"{path}: expected reports+summary (CRS) or report+highlight (GAO)")
    return str(row.get("id", path.stem)), "\n".join(section_text(body)), "\n".join(section_text(summary))


def find_layout(manual_dir: epath.Path) -> tuple[str, dict]:
    """(layout name, {split: [files]}) of the first upstream layout present in manual_dir."""
    hub = manual_dir / "document"
    if hub.is_dir():
        files = {s: sorted((hub / s).glob("*.parquet")) for s in ("train", "validation")}
        if not files["validation"]:
            raise MissingDataError(f"{hub}: no validation/*.parquet (the hub layout of ccdv/govreport-summarization)")
        return "hub", files
    originals = sorted(p for d in ("crs", "gao") for p in (manual_dir / d).glob("*.json"))
    if originals:
        return "original", {"all": originals}
    files = {s: [manual_dir / n for n in names if (manual_dir / n).exists()][:1] for s, names in FLAT.items()}
    if not files["train"]:
        raise MissingDataError(
            f"{manual_dir}: no GovReport training file; expected one of {', '.join(FLAT['train'])}, "
            "document/train/*.parquet (ccdv/govreport-summarization) or crs/*.json + gao/*.json"
        )
    if not files["validation"]:
        hint = (
            " (test.jsonl is SCROLLS' test split, whose summaries are hidden)"
            if (manual_dir / "test.jsonl").exists()
            else ""
        )
        raise MissingDataError(
            f"{manual_dir}: no GovReport validation file{hint}; expected one of {', '.join(FLAT['validation'])}"
        )
    return "flat", files


class Builder(StudyBuilder):
    name = "govreport"
    SPLIT_SIZES = {"train": 17457, "test": 837}
    DESCRIPTION = "GovReport long-document summarisation."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir one of:
      - train and validation files of SCROLLS gov_report (https://huggingface.co/datasets/tau/scrolls,
        rows {id, input, output}) as train.jsonl + validation.jsonl (or .json/.parquet);
      - the repository https://huggingface.co/datasets/ccdv/govreport-summarization as downloaded
        (document/train/*.parquet, document/validation/*.parquet; rows {report, summary});
      - the original release's crs/ and gao/ folders of per-report JSON files.
    The study's 837 evaluation reports are a seeded sample of the validation rows.
    """

    def _read(self, path):
        rows = []
        for line, row in read_records(path):
            where = f"{path}:{line}"
            doc, summary = report_and_summary(row, where)
            if not str(summary or "").strip():
                raise DataError(f"{where}: empty summary (a hidden test split cannot be used for evaluation)")
            rows.append(example(row.get("id", f"{path.stem}-{line}"), INSTRUCTION, summary, doc, answer=summary))
        return rows

    def make_splits(self, manual_dir):
        layout, files = find_layout(manual_dir)
        if layout == "original":
            rows = []
            for path in files["all"]:
                rid, doc, summary = original_release_row(path)
                if not summary.strip():
                    raise DataError(f"{path}: empty summary")
                rows.append(example(f"{path.parent.name}/{rid}", INSTRUCTION, summary, doc, answer=summary))
            train, test = split_off(rows, min(self.SPLIT_SIZES["test"], max(len(rows) // 10, 1)), self.SEED)
        else:
            train = [r for p in files["train"] for r in self._read(p)]
            test = [r for p in files["validation"] for r in self._read(p)]
        logging.info("govreport: read the %s layout of %s", layout, manual_dir)
        self.counts.update(train_rows_read=len(train), eval_rows_read=len(test))  # nothing is dropped: bad rows fail
        return {
            "train": select(train, self.SPLIT_SIZES["train"], self.SEED),
            "test": select(test, self.SPLIT_SIZES["test"], self.SEED),
        }
