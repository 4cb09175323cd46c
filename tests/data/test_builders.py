"""Each builder prepares from a manual dir in the upstream schema; real fixtures parse; bad input fails clearly."""

import json
import os
import shutil

import pytest

from data import samples
from data.datasets import DATASETS
from data.medmcqa.builder import detect_cop_base
from data.medreason.builder import match_letter, parse_options, strip_explanation
from data.prepare import data_sources
from data.records import DataError
from tests.fixtures import FIXTURES, needs_fixtures


def _text(record, key):
    return record[key].decode()


@pytest.mark.parametrize("name", DATASETS)
def test_bundled_samples_prepare_with_documented_features(name, tmp_path):
    manual = samples.write_sample_manual_dir(name, tmp_path / "manual")
    sources = data_sources(name, manual, str(tmp_path / "tfds"))
    assert set(sources) == {"train", "test"}
    record = sources["train"][0]
    assert set(record) == {"id", "instruction", "document", "target", "reasoning", "answer", "images"}
    assert _text(record, "target") and _text(record, "instruction")
    if name in ("llavacot", "invoiceocr"):
        assert record["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert len(record["images"]) == 0
    # prepared once: a second call reuses the finished dataset
    assert len(data_sources(name, manual, str(tmp_path / "tfds"))["train"]) == len(sources["train"])


def test_medreason_eval_carries_no_medmcqa_explanation(tmp_path):
    """MedReason evaluates on the MedMCQA split, but MedMCQA's `exp` is not a MedReason trace."""
    manual = samples.write_sample_manual_dir("medreason", tmp_path / "m")
    mcq_dir = samples.write_sample_manual_dir("medmcqa", tmp_path / "q")
    mcq = data_sources("medmcqa", mcq_dir, str(tmp_path / "t1"))["test"]
    assert any(mcq[i]["reasoning"] for i in range(len(mcq)))  # the explanation is there for MedMCQA
    med = data_sources("medreason", manual, str(tmp_path / "t2"))["test"]
    assert len(med) and all(med[i]["reasoning"] == b"" for i in range(len(med)))


def test_medmcqa_letters_and_eval_dedup(tmp_path):
    manual = samples.write_sample_manual_dir("medmcqa", tmp_path / "m")
    rows = [json.loads(line) for line in open(os.path.join(manual, "train.json"))]
    rows.append(dict(json.loads(open(os.path.join(manual, "dev.json")).readline()), id="dup"))  # an eval question
    with open(os.path.join(manual, "train.json"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    src = data_sources("medmcqa", manual, str(tmp_path / "t"))
    assert len(src["train"]) == 8  # the duplicate of an eval question was dropped
    by_id = {_text(src["train"][i], "id"): src["train"][i] for i in range(len(src["train"]))}
    ex = by_id["sample-mcq-2"]  # cop 3 (1-indexed) -> C
    assert _text(ex, "answer") == "C" and _text(ex, "target").startswith("C. 11")  # 4 + 7


def test_cop_indexing_is_detected_never_guessed(tmp_path):
    assert detect_cop_base([(1, {"cop": 0}), (2, {"cop": 3})], "f") == 0
    assert detect_cop_base([(1, {"cop": 4}), (2, {"cop": 1})], "f") == 1
    with pytest.raises(DataError, match="cannot tell whether cop is 0-indexed"):
        detect_cop_base([(1, {"cop": 1}), (2, {"cop": 2})], "f")
    with pytest.raises(DataError, match="unknown cop value 7"):
        detect_cop_base([(1, {"cop": 7})], "f")


def test_medreason_matching():
    opts = parse_options("Answer Choices:\nA. Aspirin\nB. Heparin (IV)\nC. None", "f")
    assert opts == {"A": "Aspirin", "B": "Heparin (IV)", "C": "None"}
    assert strip_explanation("Heparin (IV). Explanation: because ...") == "Heparin (IV)"
    assert match_letter("Heparin (IV)", opts) == "B"
    assert match_letter("heparin iv", opts) == "B"  # normalised
    assert match_letter("Heparin", opts) is None  # no fuzzy guessing
    assert parse_options("", "f") == {}


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.manual_dir .*; no such directory: .*missing$"):
        data_sources("cocohd", str(tmp_path / "missing"), str(tmp_path / "t"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no CoCoHD file; expected one of cocohd.jsonl"):
        data_sources("cocohd", str(empty), str(tmp_path / "t"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cocohd.jsonl").write_text(json.dumps({"id": "a", "transcript": "t", "target": {}}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"cocohd.jsonl:2: malformed JSON line"):
        data_sources("cocohd", str(bad), str(tmp_path / "t2"))
    assert not (tmp_path / "t2" / "cocohd" / "1.0.0").exists()  # nothing half-written looks finished
    img = tmp_path / "img"
    samples.write_sample_manual_dir("llavacot", img)
    os.remove(img / "images" / "3.png")
    with pytest.raises(DataError, match=r"train.jsonl:4: image images/3.png not found"):
        data_sources("llavacot", str(img), str(tmp_path / "t3"))
    with pytest.raises(ValueError, match="data.name='squad' is unknown"):
        data_sources("squad", str(img), str(tmp_path / "t4"))


def test_empty_split_is_an_error(tmp_path):
    manual = tmp_path / "m"
    manual.mkdir()
    (manual / "cocohd.jsonl").write_text(
        json.dumps({"id": "a", "transcript": "t", "target": samples._hearing(0)["target"], "split": "test"}) + "\n"
    )
    with pytest.raises(DataError, match="split 'train' of cocohd is empty"):
        data_sources("cocohd", str(manual), str(tmp_path / "t"))


@needs_fixtures
def test_real_records_parse(tmp_path):
    def manual(name, files):
        d = tmp_path / name
        d.mkdir()
        for src, dst in files.items():
            (d / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(FIXTURES, src), d / dst)
        return str(d)

    # MedMCQA raw (1-indexed) as dev, HF copy (0-indexed) shifted by a few rows as train
    m = manual("medmcqa", {"medmcqa/dev_raw_sample.jsonl": "dev.json"})
    hf_rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "medmcqa/dev_hf_schema_sample.jsonl"))]
    with open(os.path.join(m, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(r, question=r["question"] + " (train)")) + "\n" for r in hf_rows)
    src = data_sources("medmcqa", m, str(tmp_path / "t1"))
    raw = [json.loads(line) for line in open(os.path.join(FIXTURES, "medmcqa/dev_raw_sample.jsonl"))]
    letters = {r["id"]: "ABCD"[r["cop"] - 1] for r in raw}
    test = {_text(src["test"][i], "id"): _text(src["test"][i], "answer") for i in range(len(src["test"]))}
    assert test == letters  # raw 1-indexed cop decoded to the right letters
    train = {_text(src["train"][i], "id"): _text(src["train"][i], "answer") for i in range(len(src["train"]))}
    assert train == letters  # and the 0-indexed HF copy decodes to the same letters

    g = manual(
        "govreport",
        {
            "govreport/leval_gov_report_sample.jsonl": "train.jsonl",
            "govreport/leval_gov_report_long_sample.jsonl": "validation.jsonl",
        },
    )
    src = data_sources("govreport", g, str(tmp_path / "t2"))
    assert len(src["train"]) == 3 and len(_text(src["test"][0], "document")) > 80000

    c = manual("cocohd", {"cocohd/hearing_CHRG-118shrg51948.jsonl": "cocohd.jsonl"})
    row = json.loads(open(os.path.join(c, "cocohd.jsonl")).readline())
    with open(os.path.join(c, "cocohd.jsonl"), "w") as f:
        f.write(
            json.dumps(dict(row, split="train")) + "\n" + json.dumps(dict(row, govinfo_id="copy", split="test")) + "\n"
        )
    src = data_sources("cocohd", c, str(tmp_path / "t3"))
    assert json.loads(_text(src["train"][0], "target"))["committee"] == "Committee on the Budget"
    assert "<html>" not in _text(src["train"][0], "document")

    lc = manual(
        "llavacot", {"llava_cot/readme_examples.jsonl": "train.jsonl", "llava_cot/reasoning.png": "reasoning.png"}
    )
    rows = [json.loads(line) for line in open(os.path.join(lc, "train.jsonl"))]
    shutil.copy(os.path.join(lc, "reasoning.png"), os.path.join(lc, "again.png"))  # test is held out by image
    with open(os.path.join(lc, "train.jsonl"), "w") as f:  # only the first example's image is shipped
        f.writelines(
            json.dumps(dict(rows[0], id=f"r{i}", image=("reasoning.png", "again.png")[i % 2])) + "\n" for i in range(5)
        )
    src = data_sources("llavacot", lc, str(tmp_path / "t4"))
    assert _text(src["train"][0], "answer") == "**B**" and src["train"][0]["images"][0][:4] == b"\x89PNG"

    inv = manual("invoiceocr", {"invoice_ocr/katanaml_sparrow_donut_metadata_sample.jsonl": "metadata.jsonl"})
    for r in (json.loads(line) for line in open(os.path.join(inv, "metadata.jsonl"))):
        shutil.copy(os.path.join(FIXTURES, "llava_cot/reasoning.png"), os.path.join(inv, r["file_name"]))
    src = data_sources("invoiceocr", inv, str(tmp_path / "t5"))
    assert set(json.loads(_text(src["train"][0], "target"))) == {"header", "items", "summary"}

    mr = manual(
        "medreason",
        {
            "medmcqa/dev_raw_sample.jsonl": "dev.json",
            "medreason/medreason_evalformat_medqa_test_sample.jsonl": "medreason.jsonl",
        },
    )
    src = data_sources("medreason", mr, str(tmp_path / "t6"))
    medqa = [json.loads(line) for line in open(os.path.join(mr, "medreason.jsonl"))]
    assert len(src["train"]) == len(medqa)  # option-dict rows: every answer text matches its letter
    answers = sorted(_text(src["train"][i], "answer") for i in range(len(src["train"])))
    assert answers == sorted(r["answer_idx"] for r in medqa)


def test_fincot_drops_and_counts_training_questions_in_the_eval_set(tmp_path):
    from data.prepare import prepare

    manual = samples.write_sample_manual_dir("fincot", tmp_path / "m")
    eval_q = json.loads(open(os.path.join(manual, "finqa_test.jsonl")).readline())["question"]
    with open(os.path.join(manual, "fincot_sft.jsonl"), "a") as f:
        f.write(
            json.dumps(
                {"Question": f"Context: costs.\n{eval_q.upper()}", "Reasoning_process": "r", "Final_response": "5"}
            )
            + "\n"
        )
    builder = prepare("fincot", manual, str(tmp_path / "t"))
    assert builder.info.metadata["train_dropped_overlapping_eval"] == 1
    assert len(builder.as_data_source()["train"]) == 8  # the 8 sample questions, not the leaked one
