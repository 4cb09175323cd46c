"""FinCoT: financial chain-of-thought SFT (train) evaluated on FinQA test (numeric answers)."""

from __future__ import annotations

from data.builder_base import StudyBuilder, example, select
from data.records import find_file, normalize_text, read_records, require

INSTRUCTION = "Answer the financial question. Reason step by step, then state the final answer."


def finqa_record(row: dict, where: str) -> tuple[str, str, str, str]:
    """(id, question, context, answer) from the original FinQA schema or the flat {question, context, answer}."""
    if "qa" in row:  # original FinQA: pre_text, table, post_text, qa{question, exe_ans|answer}
        qa = row["qa"]
        require(qa, ["question"], where)
        table = "\n".join(" | ".join(str(c) for c in r) for r in row.get("table", []))
        context = "\n".join([" ".join(row.get("pre_text", [])), table, " ".join(row.get("post_text", []))])
        answer = qa.get("exe_ans", qa.get("answer", ""))
        return str(row.get("id", "")), qa["question"], context.strip(), str(answer)
    require(row, ["question", "answer"], where)
    return str(row.get("id", "")), row["question"], row.get("context", ""), str(row["answer"])


class Builder(StudyBuilder):
    name = "fincot"
    SPLIT_SIZES = {"train": 7436, "test": 1147}
    DESCRIPTION = "FinCoT SFT split for training; FinQA test for evaluation."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in data.manual_dir:
      fincot_sft.jsonl (or .parquet/.json): the SFT split of https://huggingface.co/datasets/TheFinAI/FinCoT
        with columns Question, Reasoning_process, Final_response;
      finqa_test.json (or .jsonl): FinQA's test set (https://github.com/czyssrs/FinQA dataset/test.json,
        or rows {id, question, context, answer}).
    """

    def make_splits(self, manual_dir):
        test_path = find_file(manual_dir, ["finqa_test.json", "finqa_test.jsonl", "test.json"], "FinQA test")
        test = []
        for line, row in read_records(test_path):
            rid, question, context, answer = finqa_record(row, f"{test_path}:{line}")
            test.append(
                example(rid or f"finqa-{line}", f"{INSTRUCTION}\n\nQuestion: {question}", "", context, "", answer)
            )
        test = select(test, self.SPLIT_SIZES["test"], self.SEED)
        eval_questions = [q for q in (normalize_text(r["instruction"].split("Question: ", 1)[1]) for r in test)]
        eval_questions = [q for q in eval_questions if len(q.split()) >= 5]
        train_path = find_file(manual_dir, ["fincot_sft.jsonl", "fincot_sft.parquet", "fincot_sft.json"], "FinCoT SFT")
        train, overlap = [], 0
        for line, row in read_records(train_path):
            require(row, ["Question", "Final_response"], f"{train_path}:{line}")
            norm = normalize_text(row["Question"])
            if any(q in norm for q in eval_questions):
                overlap += 1
                continue
            train.append(
                example(
                    row.get("id", f"fincot-{line}"),
                    f"{INSTRUCTION}\n\n{row['Question']}",
                    row["Final_response"],
                    reasoning=row.get("Reasoning_process", ""),
                )
            )
        self.counts["train_dropped_overlapping_eval"] = overlap
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
