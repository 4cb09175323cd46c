"""GovReport: long government reports -> summaries (RougeLsum)."""

from __future__ import annotations

from data.builder_base import StudyBuilder, example, select
from data.records import DataError, find_file, read_records

INSTRUCTION = "Summarize the following government report."


def report_and_summary(row: dict, where: str) -> tuple[str, str]:
    """SCROLLS {id, input, output} or the {report, summary} variant."""
    for doc_key, sum_key in (("input", "output"), ("report", "summary")):
        if doc_key in row and sum_key in row:
            return row[doc_key], row[sum_key]
    raise DataError(f"{where}: expected fields input/output (SCROLLS) or report/summary")


class Builder(StudyBuilder):
    name = "govreport"
    SPLIT_SIZES = {"train": 17457, "test": 837}
    DESCRIPTION = "GovReport long-document summarisation."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir: train.jsonl and validation.jsonl (or test.jsonl) of SCROLLS gov_report
    (https://huggingface.co/datasets/tau/scrolls, rows {id, input, output}) or of
    ccdv/govreport-summarization (rows {report, summary}). The study's 837 evaluation reports are a
    seeded sample of the validation file.
    """

    def _read(self, path):
        rows = []
        for line, row in read_records(path):
            doc, summary = report_and_summary(row, f"{path}:{line}")
            rows.append(example(row.get("id", f"{path.stem}-{line}"), INSTRUCTION, summary, doc, answer=summary))
        return rows

    def make_splits(self, manual_dir):
        train = self._read(find_file(manual_dir, ["train.jsonl", "train.json", "train.parquet"], "training"))
        test_path = find_file(manual_dir, ["validation.jsonl", "validation.json", "test.jsonl"], "evaluation")
        return {
            "train": select(train, self.SPLIT_SIZES["train"], self.SEED),
            "test": select(self._read(test_path), self.SPLIT_SIZES["test"], self.SEED),
        }
