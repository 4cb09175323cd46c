"""MedMCQA: 4-option medical multiple choice (accuracy). Also owns the shared evaluation split."""

from __future__ import annotations

from data.builder_base import StudyBuilder, example, select
from data.mcq_options import option_lines
from data.records import DataError, find_file, normalize_text, read_records, require

LETTERS = "ABCD"
INSTRUCTION = "Answer the following multiple-choice medical question with the letter of the correct option."
EVAL_SIZE = 3683
EVAL_SEED = 20260101
DEV_FILES = [
    "dev.json",
    "dev.jsonl",
    "validation.jsonl",
    "validation.json",
    "validation.parquet",
    "data/validation-*.parquet",  # openlifescienceai/medmcqa as the hub stores it
]
TRAIN_FILES = ["train.json", "train.jsonl", "train.parquet", "data/train-*.parquet"]


def dedup_key(question: str, options) -> str:
    """What makes two questions the same: the stem *and* its options (generic stems such as "Which of
    the following is true?" recur across unrelated questions)."""
    return normalize_text(" ".join([question, *options]))


def detect_cop_base(rows: list[tuple[int, dict]], path) -> int:
    """1 for the raw GitHub JSON (cop 1..4), 0 for the Hugging Face copy (cop 0..3). Never guesses."""
    cops = {r.get("cop") for _, r in rows if r.get("cop") is not None}
    bad = [c for c in cops if not isinstance(c, int) or not 0 <= c <= 4]
    if bad:
        raise DataError(f"{path}: unknown cop value {bad[0]!r} (expected an integer 0-3 or 1-4)")
    if 0 in cops and 4 in cops:
        raise DataError(f"{path}: cop takes both 0 and 4, so it is neither 0- nor 1-indexed")
    if 0 in cops:
        return 0
    if 4 in cops:
        return 1
    raise DataError(
        f"{path}: cannot tell whether cop is 0-indexed (Hugging Face) or 1-indexed (raw GitHub): "
        "values seen are only 1-3; pass cop_base=0 or 1 to the builder"
    )


def question_text(row: dict) -> str:
    """The stem, then one `A. <option>` line per option (data/mcq_options.py; the scorer reads them back)."""
    return f"{row['question']}\n{option_lines({letter: row['op' + letter.lower()] for letter in LETTERS})}"


def parse_rows(path, cop_base: int | None = None) -> list[tuple[str, dict]]:
    """[(de-duplication key, example)] of one MedMCQA file."""
    rows = list(read_records(path))
    base = detect_cop_base(rows, path) if cop_base is None else cop_base
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        require(row, ["question", "opa", "opb", "opc", "opd", "cop"], where)
        idx = row["cop"] - base
        if not 0 <= idx < 4:
            raise DataError(f"{where}: cop {row['cop']} is out of range for {base}-indexed options")
        letter = LETTERS[idx]
        target = f"{letter}. {row['op' + letter.lower()]}"
        ex = example(
            row.get("id", f"{path.stem}-{line}"),
            f"{INSTRUCTION}\n\n{question_text(row)}",
            target,
            reasoning=row.get("exp") or "",
            answer=letter,
        )
        out.append((dedup_key(row["question"], [row["op" + c] for c in "abcd"]), ex))
    return out


def eval_split(manual_dir, cop_base: int | None = None) -> list[tuple[str, dict]]:
    """The MedMCQA evaluation split: a seeded sample of EVAL_SIZE rows of the labelled dev file.

    MedMCQA's test split has no public labels, so evaluation uses dev; the same function serves
    MedMCQA and MedReason, so both evaluate (and de-duplicate) against the identical rows.
    """
    dev = parse_rows(find_file(manual_dir, DEV_FILES, "MedMCQA dev"), cop_base)
    return select(dev, EVAL_SIZE, EVAL_SEED)


class EvaluatedOnMedMCQA(StudyBuilder, skip_registration=True):
    """A builder whose test split is the shared MedMCQA evaluation split (MedMCQA and MedReason)."""

    def __init__(self, *args, cop_base: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cop_base = cop_base  # force 0/1-indexed `cop` when a file cannot tell

    def medmcqa_eval(self, manual_dir) -> tuple[list[dict], set[str]]:
        """(the evaluation examples, their de-duplication keys)."""
        rows = eval_split(manual_dir, self.cop_base)
        return [ex for _, ex in rows], {k for k, _ in rows}


class Builder(EvaluatedOnMedMCQA):
    name = "medmcqa"
    SPLIT_SIZES = {"train": 20000, "test": EVAL_SIZE}
    DESCRIPTION = "MedMCQA; evaluation = seeded sample of dev (test has no labels)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir MedMCQA's train and dev files: train.json + dev.json from
    https://github.com/medmcqa/medmcqa (JSON lines, cop 1-indexed), or the repository
    https://huggingface.co/datasets/openlifescienceai/medmcqa as downloaded (data/train-*.parquet,
    data/validation-*.parquet; cop 0-indexed), or train/validation .jsonl/.parquet exported from it.
    """

    def make_splits(self, manual_dir):
        test, keys = self.medmcqa_eval(manual_dir)
        train_path = find_file(manual_dir, TRAIN_FILES, "MedMCQA train")
        train = parse_rows(train_path, self.cop_base)
        kept = [ex for k, ex in train if k not in keys]
        self.counts["train_dropped_overlapping_eval"] = len(train) - len(kept)
        return {"train": select(kept, self.SPLIT_SIZES["train"], self.SEED), "test": test}
