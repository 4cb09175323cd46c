"""The builders on records in their real upstream forms: hub layouts, real fixtures, the defects
found when the builders first met real data (issue: real-data defects)."""

import json
import os
import shutil
import tracemalloc

import pytest

from data import images, samples
from data.prepare import data_sources, prepare
from data.records import DataError, MissingDataError
from data.sft import SFTOptions, tokenize_example
from data.tokenizer import Tokenizer
from tests.fixtures import FIXTURES, needs_fixtures


def _text(record, key):
    return record[key].decode()


def _rows(source):
    return [source[i] for i in range(len(source))]


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# --- LLaVA-CoT: sample first, then read only the kept images, streaming -------------------------


def test_llavacot_reads_only_the_sampled_images_in_bounded_memory(tmp_path, monkeypatch):
    from data.llavacot.builder import Builder

    manual = tmp_path / "m"
    (manual / "images").mkdir(parents=True)
    png = samples.tiny_png(2, 2, 0)
    rows = []
    for i in range(20000):
        (manual / "images" / f"{i}.png").write_bytes(png)
        turns = [
            {"from": "human", "value": f"<image>\nHow many? {i}"},
            {"from": "gpt", "value": "<CONCLUSION> 1 </CONCLUSION>"},
        ]
        if i % 1000 == 0:  # a multi-turn conversation: its later exchange is counted, never silently lost
            turns += [{"from": "human", "value": "And now?"}, {"from": "gpt", "value": "<CONCLUSION> 2 </CONCLUSION>"}]
        rows.append({"id": f"r{i}", "image": f"images/{i}.png", "conversations": turns})
    _jsonl(manual / "train.jsonl", rows)
    monkeypatch.setattr(Builder, "SPLIT_SIZES", {"train": 250, "test": 50})
    reads = []
    real_read = images.read_image
    monkeypatch.setattr(images, "read_image", lambda *a: reads.append(a[1]) or real_read(*a))
    tracemalloc.start()
    builder = prepare("llavacot", str(manual), str(tmp_path / "tfds"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(reads) == 300 and len(set(reads)) == 300
    assert peak < 64 << 20, f"peak Python memory {peak / 2**20:.1f} MiB"
    src = builder.as_data_source()
    assert len(src["train"]) == 250 and len(src["test"]) == 50
    assert builder.info.metadata["multi_turn_rows"] == 20 and builder.info.metadata["dropped_extra_turns"] == 20


def test_llavacot_bad_image_in_the_sample_is_dropped_and_counted(tmp_path):
    manual = samples.write_sample_manual_dir("llavacot", tmp_path / "m")
    (tmp_path / "m" / "images" / "0.png").write_bytes(b"<html>not an image</html>")
    builder = prepare("llavacot", manual, str(tmp_path / "t"), bad_images="drop")
    assert builder.info.metadata["dropped_bad_images"] == 1
    src = builder.as_data_source()
    assert len(src["train"]) + len(src["test"]) == 7


# --- FinCoT: one layout, FinQA targets, long contexts cut not dropped -----------------------------


FINCOT_ROW = {
    "Question": (
        "Please answer the given financial question based on the context.\n"
        "Context: the company reported revenue of $ 120 million in 2019 and $ 142 million in 2020 .\n"
        "| year | revenue |\n| 2019 | 120 |\n| 2020 | 142 |\n"
        "Question: what was the change in revenue from 2019 to 2020 in millions?\nAnswer:"
    ),
    "Reasoning_process": "142 - 120 = 22.",
    "Final_response": "The change was 22 million.",
}


def test_fincot_train_and_test_share_one_layout_and_test_has_targets(tmp_path):
    from data.fincot.builder import INSTRUCTION, split_prompt

    manual = tmp_path / "m"
    long_doc = "Paragraph of a long DocMath filing. " * 800
    _jsonl(
        manual / "fincot_sft.jsonl",
        [
            FINCOT_ROW,
            {"Question": f"{long_doc}\n\nWhat is the total debt?", "Final_response": "5", "Reasoning_process": "r"},
        ],
    )
    _jsonl(manual / "finqa_test.jsonl", [{"id": "t1", "question": "what is x?", "context": "x is 4 .", "answer": "4"}])
    src = data_sources("fincot", str(manual), str(tmp_path / "t"))
    test = _rows(src["test"])[0]
    assert _text(test, "target") == "4" and _text(test, "answer") == "4"
    assert (
        _text(test, "instruction") == f"{INSTRUCTION}\n\nQuestion: what is x?" and _text(test, "document") == "x is 4 ."
    )
    train = {_text(r, "target"): r for r in _rows(src["train"])}
    row = train["The change was 22 million."]
    assert (
        _text(row, "instruction")
        == f"{INSTRUCTION}\n\nQuestion: what was the change in revenue from 2019 to 2020 in millions?"
    )
    assert _text(row, "document").startswith("the company reported revenue") and "| 2020 | 142 |" in _text(
        row, "document"
    )
    long = train["5"]
    assert (
        _text(long, "instruction").endswith("Question: What is the total debt?")
        and len(_text(long, "document")) > 20000
    )
    # a context far longer than max_seq_len is cut, not dropped
    tok = Tokenizer(samples.write_tiny_tokenizer(tmp_path / "tok"))
    assert tokenize_example(tok, long, SFTOptions(max_seq_len=512)) is not None
    assert split_prompt("Just one line?") == ("Just one line?", "", "none")


def test_fincot_original_finqa_schema_keeps_the_gold_number(tmp_path):
    manual = samples.write_sample_manual_dir("fincot", tmp_path / "m")
    finqa = {
        "id": "ETR/2016/page_23.pdf-2",
        "pre_text": ["revenue was 5,829 in 2014 ."],
        "table": [["", "amount"], ["2014 net revenue", "$ 5735"]],
        "post_text": ["see note 2 ."],
        "qa": {
            "question": "what is the net change in net revenue?",
            "program": "subtract(5829, 5735)",
            "exe_ans": 94.0,
        },
    }
    with open(os.path.join(manual, "finqa_test.json"), "w") as f:
        json.dump([finqa], f)
    os.remove(os.path.join(manual, "finqa_test.jsonl"))
    test = _rows(data_sources("fincot", manual, str(tmp_path / "t"))["test"])[0]
    assert _text(test, "answer") == "94.0" and _text(test, "target") == "94.0"
    assert "2014 net revenue | $ 5735" in _text(test, "document")


@needs_fixtures
def test_fincot_real_finqa_record_is_a_scored_target(tmp_path):
    manual = samples.write_sample_manual_dir("fincot", tmp_path / "m")
    shutil.copy(
        os.path.join(FIXTURES, "fincot/finqa_test_record_sample.jsonl"), os.path.join(manual, "finqa_test.jsonl")
    )
    real = json.loads(open(os.path.join(FIXTURES, "fincot/finqa_test_record_sample.jsonl")).readline())
    test = _rows(data_sources("fincot", manual, str(tmp_path / "t"))["test"])[0]
    assert _text(test, "target") == str(real["answer"]) != "" and _text(test, "document") == real["context"]


# --- GovReport: validation parquet, hub layout, original release; hidden summaries refused --------


REPORT = {"report": "The agency spent 5 million.\nIt closed 2 offices.", "summary": "Spending fell.\nOffices closed."}


def test_govreport_layouts(tmp_path):
    flat = tmp_path / "flat"
    _parquet(flat / "train.parquet", [REPORT] * 3)
    _parquet(flat / "validation.parquet", [REPORT] * 2)
    assert len(data_sources("govreport", str(flat), str(tmp_path / "t1"))["test"]) == 2

    hub = tmp_path / "hub"
    _parquet(hub / "document" / "train" / "0000.parquet", [REPORT] * 3)
    _parquet(hub / "document" / "validation" / "0000.parquet", [REPORT] * 2)
    _parquet(hub / "document" / "test" / "0000.parquet", [REPORT] * 2)
    src = data_sources("govreport", str(hub), str(tmp_path / "t2"))
    assert len(src["train"]) == 3 and _text(_rows(src["test"])[0], "target") == REPORT["summary"]

    orig = tmp_path / "orig"
    crs = {
        "id": "R1",
        "title": "Farm bill",
        "reports": {
            "section_title": "Introduction",
            "paragraphs": ["Congress passed a farm bill."],
            "subsections": [{"section_title": "Costs", "paragraphs": ["It costs 2 billion."], "subsections": []}],
        },
        "summary": ["The farm bill costs 2 billion."],
    }
    gao = {
        "id": "G1",
        "report": [{"section_title": "Background", "paragraphs": ["GAO reviewed ports."], "subsections": []}],
        "highlight": [{"section_title": "What GAO Found", "paragraphs": ["Ports lack staff."]}],
    }
    for folder, row in (("crs", crs), ("gao", gao)):
        for i in range(5):
            (orig / folder).mkdir(parents=True, exist_ok=True)
            (orig / folder / f"{row['id']}{i}.json").write_text(json.dumps(row))
    src = data_sources("govreport", str(orig), str(tmp_path / "t3"))
    rows = _rows(src["train"]) + _rows(src["test"])
    by_target = {_text(r, "target"): _text(r, "document") for r in rows}
    assert by_target["What GAO Found\nPorts lack staff."] == "Background\nGAO reviewed ports."
    assert (
        by_target["The farm bill costs 2 billion."]
        == "Introduction\nCongress passed a farm bill.\nCosts\nIt costs 2 billion."
    )


def test_govreport_refuses_the_hidden_test_split(tmp_path):
    manual = tmp_path / "m"
    _jsonl(manual / "train.jsonl", [{"id": "a", "input": "report", "output": "summary"}])
    _jsonl(manual / "test.jsonl", [{"id": "b", "input": "report", "output": ""}])
    with pytest.raises(MissingDataError, match=r"no GovReport validation file \(test.jsonl is SCROLLS' test split"):
        data_sources("govreport", str(manual), str(tmp_path / "t"))
    _jsonl(manual / "validation.jsonl", [{"id": "b", "input": "report", "output": " "}])
    with pytest.raises(DataError, match=r"validation.jsonl:1: empty summary"):
        data_sources("govreport", str(manual), str(tmp_path / "t2"))


# --- CoCoHD: targets checked against the schema; the transcripts' hub layout ---------------------


def test_cocohd_targets_are_checked_against_the_schema(tmp_path):
    from data.cocohd.builder import INSTRUCTION, REQUIRED

    good = samples._hearing(0)
    missing = dict(
        samples._hearing(1), target={k: v for k, v in samples._hearing(1)["target"].items() if k != "witnesses"}
    )
    wrong = dict(samples._hearing(2), target=dict(samples._hearing(2)["target"], chamber="Parliament"))
    extra = dict(samples._hearing(3), target=dict(samples._hearing(3)["target"], govinfo_id="CHRG-x"))
    manual = tmp_path / "m"
    _jsonl(
        manual / "cocohd.jsonl",
        [dict(good, split="train"), dict(missing, split="train"), dict(wrong, split="test"), dict(extra, split="test")],
    )
    builder = prepare("cocohd", str(manual), str(tmp_path / "t"))
    meta = builder.info.metadata
    assert (meta["dropped_target_missing_keys"], meta["dropped_target_bad_values"], meta["target_keys_removed"]) == (
        1,
        1,
        1,
    )
    src = builder.as_data_source()
    assert len(src["train"]) == 1 and len(src["test"]) == 1
    target = json.loads(_text(_rows(src["test"])[0], "target"))
    assert "govinfo_id" not in target and set(REQUIRED) <= set(target)
    assert all(k in INSTRUCTION for k in REQUIRED)


@needs_fixtures
def test_cocohd_transcripts_as_the_hub_stores_them(tmp_path):
    real = json.loads(open(os.path.join(FIXTURES, "cocohd/hearing_CHRG-118shrg51948.jsonl")).readline())
    manual = tmp_path / "m"
    (manual / "data" / "CHRG-118").mkdir(parents=True)
    for suffix in ("", "b", "c"):
        (manual / "data" / "CHRG-118" / f"CHRG-118shrg51948{suffix}.txt").write_text(real["transcript"])
    target = real["target_json_rule_derived"]
    _jsonl(manual / "targets.jsonl", [{"govinfo_id": "CHRG-118shrg51948", "target": target}])
    details = {
        "govinfo_id": "CHRG-118shrg51948b",
        "title": target["title"],
        "chamber": "SENATE",
        "committee": target["committee"],
        "held_date": target["held_date"],
        "members": target["members_present"],
        "witnesses": target["witnesses"],
    }
    _parquet(manual / "hearing_details.parquet", [details])  # "c" has no target: dropped, counted
    builder = prepare("cocohd", str(manual), str(tmp_path / "t"))
    assert builder.info.metadata["dropped_no_target"] == 1
    src = builder.as_data_source()
    rows = {_text(r, "id"): r for r in _rows(src["train"]) + _rows(src["test"])}
    assert set(rows) == {"CHRG-118shrg51948", "CHRG-118shrg51948b"}
    from_details = json.loads(_text(rows["CHRG-118shrg51948b"], "target"))
    assert from_details["congress"] == "118" and from_details["chamber"] == "Senate"
    assert json.loads(_text(rows["CHRG-118shrg51948"], "target"))["committee"] == "Committee on the Budget"
    assert "<html>" not in _text(rows["CHRG-118shrg51948"], "document")


# --- MedReason / MedMCQA ------------------------------------------------------------------------


def _mcq(i, question, options, cop):
    return {
        "id": f"q{i}",
        "question": question,
        "opa": options[0],
        "opb": options[1],
        "opc": options[2],
        "opd": options[3],
        "cop": cop,
    }


def test_medmcqa_generic_stems_do_not_drop_unrelated_questions(tmp_path):
    generic = "Which of the following is true?"
    manual = tmp_path / "m"
    dev = [_mcq(0, generic, ["Aspirin is an NSAID", "b", "c", "d"], 1), _mcq(1, "Dose of x?", ["1", "2", "3", "4"], 4)]
    train = [_mcq(2, generic, ["Insulin lowers glucose", "e", "f", "g"], 1), dict(dev[0], id="leak")]
    train += [_mcq(3, "Other question", ["1", "2", "3", "4"], 2)]
    _parquet(manual / "data" / "validation-00000-of-00001.parquet", [dict(r, cop=r["cop"] - 1) for r in dev])
    _parquet(manual / "data" / "train-00000-of-00001.parquet", [dict(r, cop=r["cop"] - 1) for r in train])
    builder = prepare("medmcqa", str(manual), str(tmp_path / "t"))  # the hub's file names
    assert builder.info.metadata["train_dropped_overlapping_eval"] == 1
    ids = {_text(r, "id") for r in _rows(builder.as_data_source()["train"])}
    assert ids == {"q2", "q3"}


def test_medreason_open_ended_rows_get_an_open_instruction(tmp_path):
    from data.medmcqa.builder import INSTRUCTION
    from data.medreason.builder import OPEN_INSTRUCTION

    manual = samples.write_sample_manual_dir("medreason", tmp_path / "m")
    rows = [
        {
            "question": "What enzyme is deficient in PKU?",
            "options": "",
            "answer": "Phenylalanine hydroxylase",
            "reasoning": "r",
        },
        {
            "question": "Drug of choice?",
            "options": "Answer Choices:\nA. Aspirin\nB. Heparin",
            "answer": "Heparin",
            "reasoning": "r",
        },
    ]
    os.remove(os.path.join(manual, "medreason.jsonl"))
    _jsonl(os.path.join(manual, "ours_quality_33000.jsonl"), rows)  # the hub's file name
    builder = prepare("medreason", manual, str(tmp_path / "t"))
    train = {_text(r, "target"): _text(r, "instruction") for r in _rows(builder.as_data_source()["train"])}
    assert (
        train["Phenylalanine hydroxylase"].startswith(OPEN_INSTRUCTION)
        and "letter" not in train["Phenylalanine hydroxylase"]
    )
    assert train["B. Heparin"].startswith(INSTRUCTION)
    assert builder.info.metadata["train_open_ended"] == 1


# --- Invoice OCR: the hub's Parquet layout ------------------------------------------------------


def test_invoiceocr_hub_parquet_layout(tmp_path):
    gt = {
        "gt_parse": {
            "header": {"invoice_no": "61356291"},
            "items": [{"item_desc": "Wine"}],
            "summary": {"total": "66,00"},
        }
    }
    png = samples.tiny_png(4, 4, 1)
    row = lambda i: {"image": {"bytes": png, "path": f"{i}.png"}, "ground_truth": json.dumps(gt)}  # noqa: E731
    manual = tmp_path / "m"
    _parquet(manual / "data" / "train-00000-of-00001-abc.parquet", [row(i) for i in range(4)])
    _parquet(manual / "data" / "validation-00000-of-00001-abc.parquet", [row(9)])
    _parquet(
        manual / "data" / "test-00000-of-00001-abc.parquet",
        [row(i) for i in range(2)] + [{"image": {"bytes": b"junk"}, "ground_truth": json.dumps(gt)}],
    )
    with pytest.raises(DataError, match=r"test-00000-of-00001-abc.parquet:3: image: not a decodable image"):
        data_sources("invoiceocr", str(manual), str(tmp_path / "t0"))
    builder = prepare("invoiceocr", str(manual), str(tmp_path / "t"), bad_images="drop")
    src = builder.as_data_source()
    assert len(src["train"]) == 4 and len(src["test"]) == 2 and builder.info.metadata["dropped_bad_images"] == 1
    record = _rows(src["test"])[0]
    assert json.loads(_text(record, "target")) == gt["gt_parse"] and record["images"][0] == png


# --- every builder reports what it dropped ------------------------------------------------------

COUNTS = {
    "cocohd": {"dropped_target_missing_keys", "dropped_target_bad_values", "dropped_no_target", "target_keys_removed"},
    "govreport": {"train_rows_read", "eval_rows_read"},
    "medmcqa": {"train_dropped_overlapping_eval"},
    "medreason": {"train_dropped_overlapping_eval", "train_dropped_unmatched_answer", "train_open_ended"},
    "fincot": {"train_dropped_overlapping_eval", "train_context_by_labels"},
    "llavacot": {"multi_turn_rows", "dropped_extra_turns", "dropped_bad_images"},
    "invoiceocr": {"dropped_bad_images"},
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_every_builder_records_its_counts(tmp_path, name):
    builder = prepare(name, samples.write_sample_manual_dir(name, tmp_path / "m"), str(tmp_path / "t"))
    assert COUNTS[name] <= set(builder.info.metadata)
