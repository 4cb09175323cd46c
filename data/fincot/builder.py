"""FinCoT: financial chain-of-thought SFT (train) evaluated on FinQA test (numeric answers).

Train and test share one layout: the instruction is INSTRUCTION + "Question: <question>", and the
financial context (report text and tables) is the `document` — the only part truncation may cut,
so a long DocMath/DocFinQA context is shortened, never the reason an example is dropped. FinCoT's
`Question` field holds its own instruction, context and question in one text; `split_prompt` takes
it apart (labelled `Context:`/`Question:` sections, else the last paragraph is the question). The
FinQA test target is the gold answer, which is also kept as `answer` for the accuracy metric.
"""

from __future__ import annotations

import re

from data.builder_base import StudyBuilder, example, select
from data.records import find_file, normalize_text, read_records, require

INSTRUCTION = "Answer the financial question. Reason step by step, then state the final answer."
_LABEL = re.compile(r"^[ \t]*(context|question|answer)[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE)


def instruction(question: str) -> str:
    return f"{INSTRUCTION}\n\nQuestion: {question.strip()}"


def split_prompt(text: str) -> tuple[str, str, str]:
    """FinCoT `Question` text -> (question, context, how) with how in {"labels", "paragraphs", "none"}.

    Labelled sections ("Context: ..." / "Question: ..." / a trailing "Answer:") are taken as they
    are; text before the first label (FinCoT's own instruction) is dropped when a Context section
    exists and is the context otherwise. Unlabelled text: the last paragraph is the question and the
    paragraphs before it the context."""
    marks = list(_LABEL.finditer(text))
    sections: dict[str, str] = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        sections[m.group(1).lower()] = text[m.end() : nxt.start() if nxt else len(text)].strip()
    if sections.get("question"):
        context = sections.get("context") or text[: marks[0].start()].strip()
        return sections["question"], context, "labels"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if len(paragraphs) > 1:
        return paragraphs[-1], "\n\n".join(paragraphs[:-1]), "paragraphs"
    return text.strip(), "", "none"


def finqa_record(row: dict, where: str) -> tuple[str, str, str, str]:
    """(id, question, context, gold answer) from the original FinQA schema or the flat {question, context, answer}."""
    if "qa" in row:  # original FinQA: pre_text, table, post_text, qa{question, exe_ans, answer, program}
        qa = row["qa"]
        require(qa, ["question"], where)
        table = "\n".join(" | ".join(str(c) for c in r) for r in row.get("table", []))
        context = "\n".join([" ".join(row.get("pre_text", [])), table, " ".join(row.get("post_text", []))])
        answer = qa.get("exe_ans", qa.get("answer"))
        require({"answer": answer}, ["answer"], f"{where}: qa")
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
        test, eval_questions = [], []
        for line, row in read_records(test_path):
            rid, question, context, answer = finqa_record(row, f"{test_path}:{line}")
            test.append(example(rid or f"finqa-{line}", instruction(question), answer, context, "", answer))
            eval_questions.append(normalize_text(question))
        test = select(test, self.SPLIT_SIZES["test"], self.SEED)
        kept = {normalize_text(r["instruction"].split("Question: ", 1)[1]) for r in test}
        eval_questions = [q for q in eval_questions if q in kept and len(q.split()) >= 5]
        train_path = find_file(manual_dir, ["fincot_sft.jsonl", "fincot_sft.parquet", "fincot_sft.json"], "FinCoT SFT")
        train, overlap, layouts = [], 0, {"labels": 0, "paragraphs": 0, "none": 0}
        for line, row in read_records(train_path):
            require(row, ["Question", "Final_response"], f"{train_path}:{line}")
            norm = normalize_text(row["Question"])
            if any(q in norm for q in eval_questions):
                overlap += 1
                continue
            question, context, how = split_prompt(row["Question"])
            layouts[how] += 1
            train.append(
                example(
                    row.get("id", f"fincot-{line}"),
                    instruction(question),
                    row["Final_response"],
                    context,
                    reasoning=row.get("Reasoning_process", ""),
                )
            )
        self.counts["train_dropped_overlapping_eval"] = overlap
        self.counts.update({f"train_context_by_{k}": v for k, v in layouts.items()})
        return {"train": select(train, self.SPLIT_SIZES["train"], self.SEED), "test": test}
