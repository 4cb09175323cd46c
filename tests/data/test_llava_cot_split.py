"""The LLaVA-CoT test split is held out by image: rows that share an image never land on both sides."""

import json
import os
import shutil

import numpy as np
import pytest

from data import samples
from data.llavacot.builder import Builder
from data.prepare import prepare
from data.records import DataError
from tests.fixtures import FIXTURES, needs_fixtures

# (image, rows of it): upstream asks several questions about one picture; a few have one question
GROUPS = [(f"images/{i}.png", [3, 1, 2, 4, 1, 2, 5, 1, 3, 2][i % 10]) for i in range(20)]


def _write(manual, groups):
    """An upstream-schema manual dir {id, image, conversations}; returns {row id: image}."""
    (manual / "images").mkdir(parents=True)
    rows = []
    for g, (image, n) in enumerate(groups):
        (manual / image).write_bytes(samples.tiny_png(2, 2, g))
        for q in range(n):
            rows.append(
                {
                    "id": f"img{g}-q{q}",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": f"<image>\nQuestion {q} about picture {g}?"},
                        {"from": "gpt", "value": f"<CONCLUSION> {g}.{q} </CONCLUSION>"},
                    ],
                }
            )
    rng = np.random.default_rng(0)  # questions about one picture are not adjacent upstream
    rows = [rows[i] for i in rng.permutation(len(rows))]
    with open(manual / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [(r["id"], r["image"]) for r in rows]


def _row_rule(rows, n_test, n_train, seed):
    """The earlier rule, restated: a seeded draw of n_test rows is test, the rest sampled to n_train."""

    def take(n, k):
        return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))

    test_idx = set(take(len(rows), n_test).tolist())
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    if len(train) > n_train:
        train = [train[i] for i in take(len(train), n_train)]
    return train, [rows[i] for i in sorted(test_idx)]


def _both(train, test):
    return {im for _, im in train} & {im for _, im in test}


def _ids(source):
    return [source[i]["id"].decode() for i in range(len(source))]


def test_llavacot_test_split_holds_out_whole_images(tmp_path, monkeypatch):
    rows = _write(tmp_path / "m", GROUPS)  # 48 rows of 20 images
    monkeypatch.setattr(Builder, "SPLIT_SIZES", {"train": 30, "test": 9})
    builder = prepare("llavacot", str(tmp_path / "m"), str(tmp_path / "t"))
    src = builder.as_data_source()
    image_of = dict(rows)
    train, test = _ids(src["train"]), _ids(src["test"])
    train_images, test_images = {image_of[i] for i in train}, {image_of[i] for i in test}
    assert not train_images & test_images, f"images on both sides: {sorted(train_images & test_images)}"
    # whole images: every row of a test image is in the test split
    assert sorted(test) == sorted(i for i, im in rows if im in test_images)
    # sane sizes: the test split is the requested 9 rows (min(9, 48 // 5)), training is sampled to 30
    assert len(test) == 9 and len(train) == 30 and len(test_images) >= 2
    # the info's counts, recomputed here: the earlier row-wise draw splits some shared images
    old_train, old_test = _row_rule(rows, 9, 30, Builder.SEED)
    assert len(_both(old_train, old_test)) > 0  # the fixture does exercise the leak
    assert builder.info.metadata["images_in_both_splits_by_row_rule"] == len(_both(old_train, old_test))
    assert builder.info.metadata["images_in_both_splits"] == 0


def test_llavacot_one_image_cannot_be_split_by_image(tmp_path):
    _write(tmp_path / "m", [("images/0.png", 6)])
    with pytest.raises(DataError, match=r"train.jsonl: all 6 rows show one image; .* at least 2 images"):
        prepare("llavacot", str(tmp_path / "m"), str(tmp_path / "t"))


@needs_fixtures
def test_llavacot_real_records_with_shared_images_split_by_image(tmp_path):
    """The README's real records (flat {question, llava_cot_output}), asked again about copies of its image."""
    manual = tmp_path / "m"
    manual.mkdir()
    real = [json.loads(line) for line in open(os.path.join(FIXTURES, "llava_cot/readme_examples.jsonl"))][0]
    rows = []
    for g in range(6):
        shutil.copy(os.path.join(FIXTURES, "llava_cot", real["image"]), manual / f"{g}_{real['image']}")
        rows += [dict(real, id=f"p{g}-q{q}", image=f"./{g}_{real['image']}") for q in range(1 + g % 3)]
    with open(manual / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    builder = prepare("llavacot", str(manual), str(tmp_path / "t"))
    src = builder.as_data_source()
    train, test = _ids(src["train"]), _ids(src["test"])
    assert not {i.split("-")[0] for i in train} & {i.split("-")[0] for i in test}  # p<picture>-q<question>
    assert len(train) + len(test) == len(rows) and len(test) == len(rows) // 5
    assert src["test"][0]["answer"].decode() == "**B**" and src["test"][0]["images"][0][:4] == b"\x89PNG"
    assert builder.info.metadata["images_in_both_splits"] == 0


def test_invoiceocr_rows_sharing_an_image_stay_together(tmp_path):
    """Invoice OCR's one-folder layout: a row's id is its file name and the draw is by id, so rows that name
    one image file (a corrected re-annotation, say) already land on one side."""
    manual = samples.write_sample_manual_dir("invoiceocr", tmp_path / "s")
    rows = [json.loads(line) for line in open(os.path.join(manual, "train", "metadata.jsonl"))]
    one = tmp_path / "m"
    shutil.copytree(os.path.join(manual, "train"), one)
    rows = rows + [
        dict(r, ground_truth=r["ground_truth"].replace("Pens", "Pencils")) for r in rows
    ]  # 12 rows, 6 images
    with open(one / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    src = prepare("invoiceocr", str(one), str(tmp_path / "t")).as_data_source()
    train, test = _ids(src["train"]), _ids(src["test"])
    assert not set(train) & set(test) and len(train) + len(test) == 12 and len(test) >= 2
