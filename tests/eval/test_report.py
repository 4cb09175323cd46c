"""The report: its statistics against hand-worked numbers and scipy, and a report over run
directories in the results format (including runs that failed, have no results, or another base)."""

import csv
import json
import os

import numpy as np
import pytest

from eval import report, report_rows
from eval.report_stats import bootstrap_ci
from tests.paired import paired_p
from tests.report_runs import write_run


def test_paired_test_hand_worked_and_against_enumeration():
    """The per-pair test (scipy's, tests/paired.py) on hand-worked cases and an explicit enumeration."""
    import itertools

    # d = (1, 1, 1): of the 8 sign flips only +++ and --- reach |mean| = 1 -> p = 2/8
    assert paired_p([1, 1, 1], [0, 0, 0]) == pytest.approx(0.25)
    # d = (1, 0): flips give |mean| 0.5 always -> p = 1
    assert paired_p([1, 0], [0, 0]) == 1.0
    assert paired_p([0.3, 0.3], [0.3, 0.3]) == 1.0  # identical arms
    rng = np.random.default_rng(0)
    a, b = rng.random(12), rng.random(12) * 0.8
    d = a - b
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    flips = np.abs(signs @ d / len(d))
    assert paired_p(a, b) == pytest.approx(np.mean(flips >= abs(d.mean()) - 1e-12), abs=1e-12)  # exact both
    a, b = rng.random(200), rng.random(200) * 0.95  # Monte Carlo: two seeds agree
    assert paired_p(a, b, n_resamples=20000, seed=1) == pytest.approx(
        paired_p(a, b, n_resamples=20000, seed=2), abs=0.01
    )


def test_bootstrap_hand_worked_and_against_scipy():
    from scipy import stats

    assert bootstrap_ci([[1, 1, 1], [1, 1, 1]]) == (1.0, 1.0, 1.0)  # no spread, no interval
    x = np.random.default_rng(1).random(300)
    mean, low, high = bootstrap_ci(x, resamples=5000)
    ci = stats.bootstrap((x,), np.mean, n_resamples=5000, method="percentile", random_state=0).confidence_interval
    assert (
        mean == pytest.approx(x.mean())
        and low == pytest.approx(ci.low, abs=0.005)
        and high == pytest.approx(ci.high, abs=0.005)
    )
    # two seeds that disagree widen the interval beyond the examples' own noise
    seeds = np.stack([x, np.clip(x + 0.2, 0, 1)])
    _, low2, high2 = bootstrap_ci(seeds, resamples=2000)
    assert high2 - low2 > 2 * (high - low)


def test_pareto_front():
    # (tpot, score): b is beaten by a (faster and better); c is slower but best
    assert report_rows.pareto([(1.0, 0.5), (2.0, 0.4), (3.0, 0.9)]) == [0, 2]


def _run(root, name, arm, seed, scores, tpot, base_model="model-a", dataset="cocohd", source="training"):
    variants = {v: {"tpot_ms_p95": tpot * f} for v, f in (("base", 1.0), ("unmerged", 1.0), ("merged", 0.9))}
    write_run(root, name, dataset, arm, seed, scores, {"variants": variants}, base_model, source, format_failures=1)


def test_report_over_run_directories(tmp_path):
    root = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    truth = {"oproj": 0.8, "fc2": 0.6, "oproj_fc2": 0.85}
    for arm, level in truth.items():
        for seed in (0, 1):
            scores = np.clip(level + rng.normal(0, 0.1, size=30), 0, 1).round(3).tolist()
            tpot = {"oproj": 7.8, "fc2": 8.5, "oproj_fc2": 10.085}[arm]
            _run(root, f"cocohd_{arm}_s{seed}", arm, seed, scores, tpot)
    _run(root, "cocohd_base", "", 0, [0.1] * 30, 7.0, source="base")
    (root / "cocohd_qkv_s0").mkdir()  # killed before any result
    (root / "cocohd_all_s0").mkdir()
    (root / "cocohd_all_s0" / "launch.log").write_text("$ python main.py ...\nerror: lora.rank=0 is below 1\n")
    _run(root, "other_model_run", "oproj", 0, [1.0] * 30, 5.0, base_model="model-b")

    built = report.build(str(root), str(tmp_path / "out"))
    every = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    rows = {(r["dataset"], r["arm"]): r for r in every if r["base_model"] == "model-a"}
    assert set(rows) == {("cocohd", a) for a in ("oproj", "fc2", "oproj_fc2", "base")}
    # the run on another base is its own (dataset, base) group, not dropped
    assert [(r["dataset"], r["arm"], r["score"]) for r in every if r["base_model"] == "model-b"] == [
        ("cocohd", "oproj", "1.0000")
    ]
    for arm in truth:  # the table agrees with the runs' JSON
        runs = [json.loads((root / f"cocohd_{arm}_s{s}" / "eval" / "cocohd.json").read_text()) for s in (0, 1)]
        expected = np.mean([[e["score"] for e in r["examples"]] for r in runs])
        assert float(rows[("cocohd", arm)]["score"]) == pytest.approx(expected, abs=1e-4)
        assert float(rows[("cocohd", arm)]["ci95_low"]) < expected < float(rows[("cocohd", arm)]["ci95_high"])
        assert rows[("cocohd", arm)]["seeds"] == "2"
    assert rows[("cocohd", "fc2")]["worse_than_best_p<0.05"] == "yes"  # 0.6 vs 0.85 on 30 examples
    assert float(rows[("cocohd", "oproj_fc2")]["tpot_increase_vs_cheapest"]) == pytest.approx(
        10.085 / 7.8 - 1, abs=1e-4
    )
    assert float(rows[("cocohd", "base")]["score"]) == pytest.approx(0.1)
    missing = dict(built["missing"])
    assert missing["cocohd_qkv_s0"].startswith("no results")
    assert missing["cocohd_all_s0"] == "failed: error: lora.rank=0 is below 1"
    assert "other_model_run" not in missing
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Not in the table" in md and "cocohd_all_s0" in md and "## cocohd [model-b]" in md
    assert "![cocohd [model-a]](cocohd_model-a.png)" in md
    assert (tmp_path / "out" / "cocohd_model-a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing import event_multiplexer

    mux = event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path / "out" / "tensorboard"))
    mux.Reload()
    assert len(mux.Runs()) == 8  # 3 arms x 2 seeds + the base on model-a, one run on model-b


def test_report_of_an_empty_or_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    built = report.build(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert built["rows"] == [] and (tmp_path / "out" / "report.md").exists()
    assert report.main([f"--root={tmp_path / 'nope'}"]) == 2


@pytest.mark.parametrize(
    "latency",
    ['{"variants": {"base": 5}}', "[1, 2]", '{"variants": {"unmerged": {"tpot_ms_p95": "x"}}}'],
)
def test_malformed_latency_is_unreadable_results_not_a_crash(tmp_path, monkeypatch, latency):
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    for arm, seed in (("oproj", 0), ("fc2", 0), ("fc2", 1)):
        _run(root, f"cocohd_{arm}_s{seed}", arm, seed, [0.5, 0.7, 0.9], 8.0)
    (root / "cocohd_fc2_s1" / "eval" / "latency.json").write_text(latency)
    built = report.build(str(root), str(tmp_path / "out"))
    missing = dict(built["missing"])
    assert list(missing) == ["cocohd_fc2_s1"] and missing["cocohd_fc2_s1"].startswith(
        "unreadable results (latency.json: "
    )
    assert {(r.arm, r.seeds) for r in built["rows"]} == {("oproj", 1), ("fc2", 1)}  # the others stay
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("- cocohd_fc2_s1: unreadable results") > md.index("## Not in the table")


DIVERGED = {  # lora_jax/train.py diverged_summary
    "status": "diverged",
    "final_step": 4,
    "divergence": {"step": 4, "rule": "norm_growth", "value": 3.1e30, "limit": 120.0, "detail": "adapter norm"},
    "last_checkpoint_step": 2,
    "arm": "fc2",
    "seed": 0,
    "base_model": "model-a",
}


def test_a_diverged_run_is_listed_as_diverged(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)  # TensorBoard's import is slow
    root = tmp_path / "sweep"
    _run(root, "cocohd_oproj_s0", "oproj", 0, [0.5, 0.7, 0.9], 8.0)
    (root / "cocohd_fc2_s0").mkdir()
    (root / "cocohd_fc2_s0" / "summary.json").write_text(json.dumps(DIVERGED))
    (root / "cocohd_fc2_s0" / "launch.log").write_text("error: training diverged at step 4: adapter norm\n")
    built = report.build(str(root), str(tmp_path / "out"))
    assert dict(built["missing"]) == {
        "cocohd_fc2_s0": "diverged at step 4 (norm_growth, 3.1e+30); last checkpoint at step 2"
    }


def test_local_runner_counts_a_diverged_run_as_diverged(tmp_path, monkeypatch, capsys):
    """A run that diverges while the sweep runs (main.py exits 2 and writes summary.json "diverged"),
    and one that had diverged before (skipped on a rerun): both counted as diverged, exit status 1."""
    import subprocess

    from launch import local
    from launch.sweep import Run

    runs = [Run(n, "configs/cocohd_oproj.py", "runlocal", ()) for n in ("old", "new", "ok")]
    root = tmp_path / "root"
    (root / "old").mkdir(parents=True)
    (root / "old" / "summary.json").write_text(json.dumps(DIVERGED))

    def fake_main(cmd, cwd, stdout, stderr):  # what main.py leaves behind
        workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        status = DIVERGED if workdir.endswith("new") else {"status": "done"}
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(status, f)
        return 2 if status is DIVERGED else 0

    monkeypatch.setattr(local, "load", lambda spec: runs)
    monkeypatch.setattr(subprocess, "call", fake_main)
    assert local.status_before(str(root / "old")) == "diverged"
    assert local.main(["--sweep=x.py", f"--root={root}"]) == 1
    out = capsys.readouterr().out
    table = {
        line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in (["old"], ["new"], ["ok"])
    }
    assert table == {"old": "diverged", "new": "diverged", "ok": "finished"}, out
    assert "0 done, 1 finished, 0 resumed, 0 failed, 2 diverged" in out
    assert "diverged at step 4 (norm_growth, 3.1e+30)" in out


def test_report_says_what_the_means_are_over(tmp_path, monkeypatch):
    """p_vs_best is not "on the same examples": each arm's mean is over the examples its seeds scored,
    arms are paired on those they share; arms over different examples are named with their counts."""
    monkeypatch.setattr(report, "write_hparams", lambda *a: None)
    root = tmp_path / "sweep"
    _run(root, "cocohd_oproj_s0", "oproj", 0, [0.5, 0.7, 0.9, 0.4], 8.0)
    _run(root, "cocohd_fc2_s0", "fc2", 0, [0.5, 0.7, 0.9], 8.0)
    report.build(str(root), str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "on the same examples" not in md and "paired on the examples they share" in md
    assert "over different examples (fc2: 3, oproj: 4)" in md
