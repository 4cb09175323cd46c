"""The report over a sweep root shaped like the study's grid (five text datasets on one base, two
image datasets on a vision base, two seeds, base-model runs): the arms x datasets table and every
per-dataset table, numbers recomputed here from the JSON; lower-is-better metrics; the comparison
with the best arm against a simulation of equal arms; latency from several device kinds."""

import csv
import json

import numpy as np
import pytest

from configs.sweeps.study import STUDY_ARMS
from eval import metrics, report

TEXT_BASE, VISION_BASE = "3f9c2a7d1b4e5f60", "random-llava-8d2e4c1a0b9f7e6d"
IMAGE = ("llavacot", "invoiceocr")
METRIC = {  # configs/base.py SUITES
    "fincot": "finqa_accuracy",
    "govreport": "rouge_lsum",
    "medmcqa": "mcq_accuracy",
    "medreason": "mcq_accuracy",
    "cocohd": "json_key_value_match",
    "llavacot": "exact_match",
    "invoiceocr": "field_accuracy",
}
BINARY = {"finqa_accuracy", "mcq_accuracy", "exact_match"}
# the arm's skill added to each example's difficulty, and its decode cost over the base model
SKILL = {"qkv": -0.04, "oproj": 0.0, "fc1": -0.02, "fc2": -0.05, "oproj_fc1": 0.01}
SKILL.update(qkv_fc1=0.0, oproj_fc2=0.02, qkv_fc2=-0.01, all=0.015)
COST = {"qkv": 0.18, "oproj": 0.05, "fc1": 0.20, "fc2": 0.12, "oproj_fc1": 0.25, "qkv_fc1": 0.38}
COST.update(oproj_fc2=0.29, qkv_fc2=0.30, all=0.45)
N = 40  # examples per dataset


def write_run(root, name, dataset, arm, seed, scores, latency, base_model, source="training"):
    d = root / name
    (d / "eval").mkdir(parents=True)
    examples = [{"id": f"{dataset}-{i}", "prediction": "p", "reference": "r", "score": s} for i, s in enumerate(scores)]
    suite = {"suite": dataset, "dataset": dataset, "split": "test", "metric": METRIC.get(dataset, "planted_rate")}
    suite.update(score=float(np.mean(scores)), num_examples=len(scores), format_failures=0, adapter_source=source)
    (d / "eval" / f"{dataset}.json").write_text(json.dumps(dict(suite, examples=examples)))
    if latency is not None:
        (d / "eval" / "latency.json").write_text(json.dumps(latency))
    meta = {
        "arm": arm,
        "seed": seed,
        "base_model": base_model,
        "trainable_params": 1000,
        "peft_equivalent_params": 1200,
    }
    (d / "eval" / "results.json" if source == "base" else d / "summary.json").write_text(json.dumps(meta))


def latency_json(base_ms, unmerged_ms, device, count=1, tensor=1):
    v = {k: {"tpot_ms_p95": t, "tpot_ms_p50": t * 0.9} for k, t in (("base", base_ms), ("unmerged", unmerged_ms))}
    v["merged"] = {"tpot_ms_p95": base_ms * 1.01}
    out = {"device": device, "variants": v, "tpot_p95_increase_unmerged": unmerged_ms / base_ms - 1}
    if count is not None:  # files from before device_count / mesh were recorded lack them
        out.update(device_count=count, mesh={"data": 1, "fsdp": 1, "tensor": tensor})
    return out


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The study's grid: every (dataset, arm) of STUDY_ARMS x 2 seeds, a base-model run per dataset."""
    root = tmp_path_factory.mktemp("grid") / "sweep"
    rng = np.random.default_rng(0)
    for dataset, arms in STUDY_ARMS.items():
        base = VISION_BASE if dataset in IMAGE else TEXT_BASE
        device, count = ("TPU v5 lite", 4) if dataset in IMAGE else ("NVIDIA H100 80GB HBM3", 1)
        base_ms = 14.0 if dataset in IMAGE else 9.0
        difficulty = rng.beta(4, 3, size=N)
        for arm in (*arms, "base"):
            for seed in (0, 1) if arm != "base" else (0,):
                p = np.clip(difficulty + (SKILL[arm] if arm != "base" else -0.3) + rng.normal(0, 0.02), 0, 1)
                if METRIC[dataset] in BINARY:
                    scores = (rng.random(N) < p).astype(float).tolist()
                else:
                    scores = np.clip(p + rng.normal(0, 0.08, N), 0, 1).round(4).tolist()
                b = base_ms * rng.uniform(0.97, 1.03)
                u = b * (1 + COST[arm]) * rng.uniform(0.99, 1.01) if arm != "base" else b
                # govreport's latency files come from before device_count / mesh were recorded
                lat = latency_json(b, u, device, None if dataset == "govreport" else count, count)
                source = "base" if arm == "base" else "training"
                name = f"{dataset}_base" if arm == "base" else f"{dataset}_{arm}_s{seed}"
                write_run(root, name, dataset, "" if arm == "base" else arm, seed, scores, lat, base, source)
    out = root.parent / "out"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(report, "write_hparams", lambda *a: None)  # TensorBoard's import is slow
        built = report.build(str(root), str(out))
    return root, out, built


def _truth(root):
    """From the JSON alone: {(dataset, arm): (mean over seeds and examples, [per-run latency])}."""
    cells = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        suite = json.loads(
            next(f for f in (d / "eval").glob("*.json") if f.stem not in ("latency", "results")).read_text()
        )
        arm = "base" if suite["adapter_source"] == "base" else json.loads((d / "summary.json").read_text())["arm"]
        lat = json.loads((d / "eval" / "latency.json").read_text())
        cells.setdefault((suite["dataset"], arm), ([], []))
        cells[(suite["dataset"], arm)][0].append([e["score"] for e in suite["examples"]])
        cells[(suite["dataset"], arm)][1].append(lat)
    return {k: (float(np.mean(s)), lats) for k, (s, lats) in cells.items()}


def test_study_grid_renders_every_table(grid):
    root, out, built = grid
    truth = _truth(root)
    assert built["missing"] == []  # nothing dropped: image runs on their own base are in the table
    rows = list(csv.DictReader(open(out / "report.csv")))
    per_dataset = {(r["dataset"], r["arm"]): r for r in rows if r["dataset"] != "average"}
    assert set(per_dataset) == set(truth)
    for (dataset, arm), (mean, lats) in truth.items():
        r = per_dataset[(dataset, arm)]
        assert r["base_model"] == (VISION_BASE if dataset in IMAGE else TEXT_BASE)
        assert float(r["score"]) == pytest.approx(mean, abs=1e-4)
        assert float(r["ci95_low"]) < mean < float(r["ci95_high"])
        assert r["seeds"] == ("1" if arm == "base" else "2")
        key = "base" if arm == "base" else "unmerged"
        tpot = np.mean([lat["variants"][key]["tpot_ms_p95"] for lat in lats])
        assert float(r["tpot_p95_ms_unmerged"]) == pytest.approx(tpot, abs=1e-4)
        if arm != "base":  # each run's own interleaved ratio, averaged
            ratio = np.mean(
                [lat["variants"]["unmerged"]["tpot_ms_p95"] / lat["variants"]["base"]["tpot_ms_p95"] for lat in lats]
            )
            assert float(r["tpot_p95_unmerged_over_base"]) == pytest.approx(ratio, abs=1e-4)
        assert r["latency_device_count"] == ("?" if dataset == "govreport" else "4" if dataset in IMAGE else "1")
        assert r["latency_mesh_data_x_fsdp_x_tensor"] == (
            "?" if dataset == "govreport" else "1x1x4" if dataset in IMAGE else "1x1x1"
        )

    # the study's table: compared arms are those that ran on all seven datasets, averaged over all seven
    everywhere = [a for a in STUDY_ARMS["fincot"] if all(a in arms for arms in STUDY_ARMS.values())]
    assert sorted(everywhere) == sorted(built["summary"].compared) and len(everywhere) == 6
    best = {d: max(truth[(d, a)][0] for a in arms) for d, arms in STUDY_ARMS.items()}
    table = {r["arm"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert set(table) == set(STUDY_ARMS["fincot"]) | {"base"}
    for arm, r in table.items():
        for d, arms in STUDY_ARMS.items():
            if arm in arms or arm == "base":
                assert float(r[d]) == pytest.approx(truth[(d, arm)][0], abs=1e-5)
            else:
                assert r[d] == "not run"
        if arm in everywhere:
            raw = np.mean([truth[(d, arm)][0] for d in STUDY_ARMS])
            rel = np.mean([truth[(d, arm)][0] / best[d] for d in STUDY_ARMS])
            assert float(r["average"]) == pytest.approx(raw, abs=1e-5)
            assert float(r["relative_to_best"]) == pytest.approx(rel, abs=1e-5)
            assert float(r["relative_ci95_low"]) < rel < float(r["relative_ci95_high"])
            assert r["averaged_over"] == "+".join(built["summary"].averaged) and len(built["summary"].averaged) == 7
            for base, ds in ((TEXT_BASE, [d for d in STUDY_ARMS if d not in IMAGE]), (VISION_BASE, IMAGE)):
                lats = [lat for d in ds for lat in truth[(d, arm)][1]]
                tpot = np.mean([lat["variants"]["unmerged"]["tpot_ms_p95"] for lat in lats])
                assert float(r[f"tpot_p95_ms_unmerged[{base}]"]) == pytest.approx(tpot, abs=1e-4)
        elif arm != "base":  # marked with what it lacks, not averaged
            lacks = [d for d in built["summary"].averaged if arm not in STUDY_ARMS[d]]
            assert r["average"] == "" and r["not_averaged_lacks"] == "+".join(lacks) and lacks
    averages = {r["arm"]: r for r in rows if r["dataset"] == "average"}
    for arm in everywhere:
        assert averages[arm]["score"] == f"{float(table[arm]['average']):.4f}"

    md = (out / "report.md").read_text()
    first = md.index("## Arms x datasets")
    assert all(md.index(f"## {d}\n") > first for d in STUDY_ARMS)  # the study's table on top, then each dataset
    assert report.PROCEDURE in md and "![average score vs TPOT p95](summary.png)" in md
    assert md.count("— (not run)") == sum(
        1 for a in STUDY_ARMS["fincot"] for arms in STUDY_ARMS.values() if a not in arms
    )
    assert (out / "summary.png").stat().st_size > 0 and (out / "llavacot.png").stat().st_size > 0

    # the summary plot's data: the compared arms' mean TPOT over the datasets vs relative average
    from eval.report_summary import summary_points

    points, front = summary_points(built["summary"])
    assert sorted(p["arm"] for p in points) == sorted(everywhere)
    for p in points:
        tpot = np.mean(
            [
                np.mean([lat["variants"]["unmerged"]["tpot_ms_p95"] for lat in truth[(d, p["arm"])][1]])
                for d in STUDY_ARMS
            ]
        )
        assert p["x"] == pytest.approx(tpot) and p["y"] == pytest.approx(
            float(table[p["arm"]]["relative_to_best"]), abs=1e-5
        )
    xy = [(p["x"], p["y"]) for p in points]
    dominated = {i for i, (x, y) in enumerate(xy) for x2, y2 in xy if x2 <= x and y2 >= y and (x2, y2) != (x, y)}
    assert sorted(front) == sorted(set(range(len(xy))) - dominated) and front


def test_lower_is_better_ranks_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "LOWER_IS_BETTER", frozenset({"planted_rate"}), raising=False)
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)  # TensorBoard's import is slow
    root = tmp_path / "sweep"
    rng = np.random.default_rng(1)
    rate = {"oproj": 0.1, "fc2": 0.5, "qkv": 0.45}  # planted answers given: oproj is the best arm
    tpot = {"oproj": 9.0, "fc2": 8.0, "qkv": 10.0}
    for arm, level in rate.items():
        for seed in (0, 1):
            scores = (rng.random(60) < level).astype(float).tolist()
            write_run(
                root, f"planted_{arm}_s{seed}", "planted", arm, seed, scores, latency_json(7.0, tpot[arm], "cpu"), "m"
            )
    built = report.build(str(root), str(tmp_path / "out"))
    rows = {r.arm: r for r in built["rows"]}
    means = {a: rows[a].mean for a in rate}
    assert rows["oproj"].p_vs_best == 1.0 and rows["fc2"].significant and rows["qkv"].significant
    assert rows["oproj"].rel_to_best == 1.0
    assert rows["fc2"].rel_to_best == pytest.approx(means["oproj"] / means["fc2"])
    # Pareto (lower TPOT, lower rate): fc2 is fastest, oproj best; qkv is beaten by oproj on both
    pts = [(tpot[a], means[a]) for a in rate]
    assert [list(rate)[i] for i in report.pareto(pts, higher_is_better=False)] == ["fc2", "oproj"]
    assert built["groups"][0].higher_is_better is False
    summary = built["summary"]
    assert summary.raw_direction == "lower"
    assert [a.arm for a in summary.arms][0] == "oproj" and summary.arms[0].rel.mean == 1.0
    assert summary.arms[0].raw.p_vs_best == 1.0 and all(a.raw.worse for a in summary.arms[1:])
    # --arms picks the compared arms; an arm no run has is a one-line error
    assert report.main([f"--root={root}", f"--out={tmp_path / 'out2'}", "--arms=fc2,qkv"]) == 0
    assert [r["arm"] for r in csv.DictReader(open(tmp_path / "out2" / "summary.csv")) if r["average"]] == sorted(
        ["fc2", "qkv"], key=means.get
    )  # ranked lower-first
    assert report.main([f"--root={root}", "--arms=oproj,nope"]) == 2


def test_comparison_with_the_best_holds_its_level_when_arms_are_equal():
    """Eight equal arms (shared per-example difficulty, a seed effect, two seeds), many simulated
    studies: the report's procedure flags <= 5% of the arms; the per-arm paired test against the
    best arm picked from the same data flags more."""
    from eval.report_stats import compare_with_best, observed_means, paired_p_value, resample_means

    rng = np.random.default_rng(0)
    arms, n, seeds, studies = 8, 60, 2, 150
    new = old = 0
    for _ in range(studies):
        difficulty = rng.beta(2, 2, size=n)
        mats = [
            (rng.random((seeds, n)) < np.clip(difficulty + rng.normal(0, 0.03, (seeds, 1)), 0, 1)).astype(float)
            for _ in range(arms)
        ]
        observed = observed_means(mats)
        p = compare_with_best(observed, resample_means(mats, 400, seed=int(rng.integers(1 << 30))))
        new += int(np.sum(p < report.SIGNIFICANCE))
        per_example, best = np.array([m.mean(0) for m in mats]), int(np.argmax(observed))
        old += sum(
            paired_p_value(per_example[i], per_example[best], resamples=400) < report.SIGNIFICANCE
            for i in range(arms)
            if i != best
        )
    new_rate, old_rate = new / (studies * arms), old / (studies * arms)
    print(f"flagged arms: max-T with the best re-picked {new_rate:.4f}, per-arm test vs picked best {old_rate:.4f}")
    assert new_rate <= 0.05 and old_rate > 0.05 and old_rate > 2 * new_rate


def test_latency_from_several_device_kinds(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    rng = np.random.default_rng(2)
    runs = {  # (arm, seed): (device, base ms, unmerged ms)
        ("oproj", 0): ("NVIDIA H100", 9.0, 9.9),
        ("oproj", 1): ("TPU v5 lite", 4.0, 4.2),  # another machine: its absolute TPOT is not comparable
        ("fc2", 0): ("NVIDIA H100", 9.2, 10.6),
        ("fc2", 1): ("NVIDIA H100", 8.8, 10.0),
        ("all", 0): ("NVIDIA H100", 9.1, 13.0),
        ("all", 1): ("NVIDIA H100", 9.0, 12.6),
    }
    for (arm, seed), (device, b, u) in runs.items():
        scores = (rng.random(30) < 0.7).astype(float).tolist()
        write_run(root, f"medmcqa_{arm}_s{seed}", "medmcqa", arm, seed, scores, latency_json(b, u, device), "m")
    built = report.build(str(root), str(tmp_path / "out"))
    rows = {r.arm: r for r in built["rows"]}
    assert rows["oproj"].seeds == 2  # its scores stay
    assert rows["oproj"].tpot_unmerged == pytest.approx(9.9) and rows["oproj"].tpot_ratio == pytest.approx(9.9 / 9.0)
    assert rows["fc2"].tpot_ratio == pytest.approx(np.mean([10.6 / 9.2, 10.0 / 8.8]))
    assert rows["oproj"].device == "NVIDIA H100" and rows["oproj"].device_count == "1" and rows["oproj"].mesh == "1x1x1"
    assert rows["all"].tpot_increase == pytest.approx(12.8 / 9.9 - 1)
    missing = dict(built["missing"])
    assert set(missing) == {"medmcqa_oproj_s1"}
    assert "TPU v5 lite" in missing["medmcqa_oproj_s1"] and "NVIDIA H100" in missing["medmcqa_oproj_s1"]
    assert "4.20 ms" in missing["medmcqa_oproj_s1"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("medmcqa_oproj_s1") > md.index("## Not in the table")
    header = next(line for line in md.splitlines() if line.startswith("| arm | metric"))
    assert "tpot_p95_unmerged_over_base" in header and "latency_device_count" in header
    assert built["summary"].base_devices == {"m": "NVIDIA H100"}
