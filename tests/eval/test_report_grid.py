"""The report over a sweep root shaped like the study's grid (five text datasets on one base, two
image datasets on a vision base, two seeds, base-model runs): the arms x datasets table and every
per-dataset table, numbers recomputed here from the JSON; lower-is-better metrics; the comparison
with the best arm against a simulation of equal arms; latency from several device kinds."""

import csv
import json

import numpy as np
import pytest

from configs.sweeps.study import STUDY_ARMS
from eval import metrics, report, report_rows
from tests.report_runs import METRIC, write_run

TEXT_BASE, VISION_BASE = "3f9c2a7d1b4e5f60", "random-llava-8d2e4c1a0b9f7e6d"
IMAGE = ("llavacot", "invoiceocr")
BINARY = {"finqa_accuracy", "mcq_accuracy", "exact_match"}
# the arm's skill added to each example's difficulty, and its decode cost over the base model
SKILL = {"qkv": -0.04, "oproj": 0.0, "fc1": -0.02, "fc2": -0.05, "oproj_fc1": 0.01}
SKILL.update(qkv_fc1=0.0, oproj_fc2=0.02, qkv_fc2=-0.01, all=0.015)
COST = {"qkv": 0.18, "oproj": 0.05, "fc1": 0.20, "fc2": 0.12, "oproj_fc1": 0.25, "qkv_fc1": 0.38}
COST.update(oproj_fc2=0.29, qkv_fc2=0.30, all=0.45)
N = 40  # examples per dataset


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
    assert report_rows.PROCEDURE in md and "![average score vs TPOT p95](summary.png)" in md
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
    assert rows["oproj"].rel_to_best == 1.0  # lower is better: 1 - (score - best)
    assert rows["fc2"].rel_to_best == pytest.approx(1 - (means["fc2"] - means["oproj"]))
    # Pareto (lower TPOT, lower rate): fc2 is fastest, oproj best; qkv is beaten by oproj on both
    pts = [(tpot[a], means[a]) for a in rate]
    assert [list(rate)[i] for i in report_rows.pareto(pts, higher_is_better=False)] == ["fc2", "oproj"]
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


def _studies(rng, studies, arms, n, seed_sd, worse=0.0, seeds=2):
    """[studies][arms] of [seeds, n] binary scores: shared Beta(2, 2) difficulties (true mean 0.5 for
    an equal arm), a normal seed shift per (arm, seed); the last arm `worse` below the others."""
    difficulty = rng.beta(2, 2, size=(studies, 1, 1, n))
    shift = rng.normal(0, seed_sd, (studies, arms, seeds, 1)) - worse * (np.arange(arms) == arms - 1)[:, None, None]
    scores = (rng.random((studies, arms, seeds, n)) < np.clip(difficulty + shift, 0, 1)).astype(float)
    return [list(study) for study in scores]


def _compare(studies, resamples=400, seed=0):
    """(p [studies, arms] of compare_with_best, intervals [studies, arms, 2]) over simulated studies."""
    from eval.report_stats import compare_with_best, interval, observed_means, resample_means

    ps, cis = [], []
    for k, mats in enumerate(studies):
        resampled = resample_means(mats, resamples, seed=seed + k)
        ps.append(compare_with_best(observed_means(mats), resampled))
        cis.append([interval(resampled[:, a]) for a in range(len(mats))])
    return np.array(ps), np.array(cis)


@pytest.mark.parametrize(
    "regime, n, seed_sd, studies",
    [("example noise dominates", 300, 0.0, 150), ("seed noise dominates", 1000, 0.03, 200)],
)
def test_comparison_with_the_best_holds_its_familywise_level(regime, n, seed_sd, studies):
    """Eight equal arms, two seeds, many simulated studies: the share of studies where ANY arm is
    flagged (the familywise error the caption claims) is <= 5% + two Monte-Carlo errors, and the
    per-arm 95% intervals cover the true mean. Where seed noise dominates, resampling each arm's two
    seed deviations (the old seed term: half the seed variance, no allowance for its 1 degree of
    freedom) flagged 24% of studies and covered 81%."""
    arms, alpha = 8, report_rows.SIGNIFICANCE
    p, ci = _compare(_studies(np.random.default_rng(0), studies, arms, n, seed_sd), resamples=300)
    fwer = np.mean((p < alpha).any(axis=1))
    coverage = np.mean((ci[..., 0] <= 0.5) & (0.5 <= ci[..., 1]))
    print(f"{regime}: FWER {fwer:.3f}, arms flagged {np.mean(p < alpha):.4f}, interval coverage {coverage:.3f}")
    assert fwer <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / studies)
    assert coverage >= 0.93


@pytest.mark.parametrize("n, seed_sd, worse", [(300, 0.0, 0.12), (1000, 0.03, 0.2)])
def test_comparison_with_the_best_finds_a_worse_arm(n, seed_sd, worse):
    """One arm truly worse than seven equal ones is flagged in most studies (a procedure that never
    rejects fails here), and the equal arms stay at the familywise level."""
    studies, alpha = 60, report_rows.SIGNIFICANCE
    runs = _studies(np.random.default_rng(1), studies, 8, n, seed_sd, worse=worse)
    p, _ = _compare(runs, resamples=300, seed=10_000)
    power, fwer = np.mean(p[:, -1] < alpha), np.mean((p[:, :-1] < alpha).any(axis=1))
    print(f"n={n} seed sd {seed_sd}, one arm {worse} worse: flagged in {power:.2f} of studies; equal arms {fwer:.2f}")
    assert power >= 0.8 and fwer <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / studies)


def test_bootstrap_interval_of_one_arm_covers_with_two_seeds():
    """One arm, two seeds, seed noise dominating: its 95% interval covers the true mean (0.5) about
    95% of the time (resampling the two seed deviations covered about 75%)."""
    from eval.report_stats import bootstrap_ci

    studies = 200
    runs = _studies(np.random.default_rng(2), studies, 1, 1000, 0.03)
    covered = [
        low <= 0.5 <= high for k, (m,) in enumerate(runs) for _, low, high in [bootstrap_ci(m, resamples=200, seed=k)]
    ]
    print(f"one arm, n=1000, seed sd 0.03: coverage {np.mean(covered):.3f}")
    assert np.mean(covered) >= 0.95 - 2 * np.sqrt(0.05 * 0.95 / studies)


def test_picking_the_best_then_testing_each_arm_flags_too_many():
    """Why the report does not use the paired test per arm against the best arm picked from the same
    data: with eight equal arms it flags more than 5% of them; the report's procedure far fewer."""
    from tests.paired import paired_p

    studies, arms = 100, 8
    runs = _studies(np.random.default_rng(3), studies, arms, 60, 0.0)
    p, _ = _compare(runs, seed=20_000)
    old = 0
    for mats in runs:
        per_example = np.array([m.mean(0) for m in mats])
        best = int(np.argmax(per_example.mean(1)))
        old += sum(
            paired_p(per_example[i], per_example[best], n_resamples=400) < report_rows.SIGNIFICANCE
            for i in range(arms)
            if i != best
        )
    new_rate, old_rate = np.mean(p < report_rows.SIGNIFICANCE), old / (studies * arms)
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


def test_lower_is_better_with_a_best_of_zero(tmp_path, monkeypatch):
    """A lower-is-better rate whose best arm scores 0: relative to best stays defined (1 - (score -
    best)) and ranks the best first, never NaN-first (best / score gave NaN for the best, 0 for all)."""
    monkeypatch.setattr(metrics, "LOWER_IS_BETTER", frozenset({"planted_rate"}), raising=False)
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    rng = np.random.default_rng(4)
    rate = {"oproj": 0.0, "qkv": 0.2, "fc2": 0.5}
    for arm, level in rate.items():
        for seed in (0, 1):
            scores = (rng.random(60) < level).astype(float).tolist()
            write_run(root, f"planted_{arm}_s{seed}", "planted", arm, seed, scores, latency_json(7.0, 8.0, "cpu"), "m")
    built = report.build(str(root), str(tmp_path / "out"))
    rows = {r.arm: r for r in built["rows"]}
    assert rows["oproj"].mean == 0.0 and rows["oproj"].rel_to_best == 1.0
    for arm in ("qkv", "fc2"):
        assert rows[arm].rel_to_best == pytest.approx(1 - rows[arm].mean) and rows[arm].rel_to_best < 1
        assert np.isfinite([rows[arm].rel_low, rows[arm].rel_high]).all()
    table = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["arm"] for r in table] == ["oproj", "qkv", "fc2"]  # best first
    assert [float(r["relative_to_best"]) for r in table] == pytest.approx(
        [1.0, 1 - rows["qkv"].mean, 1 - rows["fc2"].mean]
    )
    assert table[0]["relative_worse_than_best"] == "no" and table[2]["relative_worse_than_best"] == "yes"


def test_arms_that_share_no_dataset_are_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    rng = np.random.default_rng(5)
    for dataset, arm in (("medmcqa", "oproj"), ("fincot", "fc2"), ("fincot", "oproj")):
        scores = (rng.random(20) < 0.6).astype(float).tolist()
        write_run(root, f"{dataset}_{arm}", dataset, arm, 0, scores, latency_json(7.0, 8.0, "cpu"), "m")
    capsys.readouterr()
    assert report.main([f"--root={root}", "--arms=oproj,fc2"]) == 0  # they share fincot
    write_run(root, "govreport_qkv", "govreport", "qkv", 0, [0.5] * 20, latency_json(7.0, 8.0, "cpu"), "m")
    capsys.readouterr()
    assert report.main([f"--root={root}", "--arms=qkv,fc2"]) == 2
    assert capsys.readouterr().err == "error: --arms: qkv, fc2 share no dataset\n"


def test_a_dataset_left_out_of_its_base_tpot_column_is_listed(tmp_path, monkeypatch):
    """Per base, the TPOT column is measured on the base's most common device kind; a dataset whose
    runs were measured on another kind is left out of it and said so under "Not in the table"."""
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    rng = np.random.default_rng(6)
    for dataset, device, ms in (
        ("medmcqa", "NVIDIA H100", 10.0),
        ("fincot", "NVIDIA H100", 12.0),
        ("cocohd", "TPU v5 lite", 5.0),
    ):
        for arm in ("oproj", "fc2"):
            scores = (rng.random(20) < 0.6).astype(float).tolist()
            write_run(root, f"{dataset}_{arm}", dataset, arm, 0, scores, latency_json(7.0, ms, device), "m")
    built = report.build(str(root), str(tmp_path / "out"))
    summary = built["summary"]
    assert summary.base_devices == {"m": "NVIDIA H100"}
    assert summary.arms[0].tpot["m"] == pytest.approx(11.0)  # medmcqa and fincot only
    missing = dict(built["missing"])
    assert set(missing) == {"cocohd"}
    assert "TPU v5 lite" in missing["cocohd"] and "NVIDIA H100" in missing["cocohd"] and "column" in missing["cocohd"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("- cocohd: latency on TPU v5 lite") > md.index("## Not in the table")
