"""The study's table from a sweep's root directory: datasets x arms, with intervals, tests, latency.

    python -m eval.report --root=/tmp/sweeps/cocohd [--out=<root>/report]

Reads only the JSON files in the run workdirs under --root (summary.json, eval/<suite>.json,
eval/latency.json, eval/results.json), never a model, so a report can be rebuilt anywhere from a
copied results folder. Writes to --out:
  report.md, report.csv — one row per (dataset, arm): the metric's mean over seeds with a 95%
      bootstrap interval (over examples and seeds; eval/report_stats.py), format failures, the
      paired test against the dataset's best arm on the same examples (p, and whether p < 0.05),
      trainable parameters (ours and what PEFT's separate q/k/v, gate/up adapters would train),
      TPOT p95 unmerged and merged, and the TPOT increase over the dataset's cheapest arm; plus a
      base-model row per dataset when a run scored the base (mode=eval with no adapter);
  <dataset>.png — metric vs TPOT p95 (unmerged), one point per arm with its interval, the Pareto
      front (no arm both faster and better), the base model as a horizontal line;
  tensorboard/ — one hparams run per (dataset, arm, seed) with its metric and TPOT, so TensorBoard's
      HParams tab compares the arms.
Runs without results, failed runs (their launch.log's last error line), and runs on another base
model than the report's (the most common one) are listed under "Not in the table", never a crash.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import sys

import numpy as np

from eval.report_stats import bootstrap_ci, paired_p_value

SIGNIFICANCE = 0.05


@dataclasses.dataclass
class RunResult:
    name: str
    dataset: str
    arm: str  # "base" for a base-model evaluation
    seed: int
    metric: str
    scores: dict  # example id -> score
    format_failures: int
    base_model: str
    trainable_params: int | None = None
    peft_params: int | None = None
    tpot_unmerged: float | None = None  # ms, p95
    tpot_merged: float | None = None


def _json(path):
    with open(path) as f:
        return json.load(f)


def read_run(run_dir: str) -> tuple[list[RunResult], str | None]:
    """(results of the run — one per suite file —, or why it has none)."""
    name = os.path.basename(run_dir.rstrip("/"))
    eval_dir = os.path.join(run_dir, "eval")
    suites = (
        [f for f in sorted(os.listdir(eval_dir)) if f.endswith(".json") and f not in ("latency.json", "results.json")]
        if os.path.isdir(eval_dir)
        else []
    )
    if not suites:
        log = os.path.join(run_dir, "launch.log")
        if os.path.exists(log):
            lines = [line.strip() for line in open(log, errors="replace") if line.strip()]
            errors = [line for line in lines if line.startswith("error:")] or lines[-1:]
            return [], f"failed: {errors[-1][:160]}" if errors else "failed"
        return [], "no results (no eval/<suite>.json)"
    meta = {}
    for path in (os.path.join(eval_dir, "results.json"), os.path.join(run_dir, "summary.json")):
        if os.path.exists(path):  # mode=eval's results, else training's summary
            meta = _json(path)
            break
    latency = (
        _json(os.path.join(eval_dir, "latency.json")) if os.path.exists(os.path.join(eval_dir, "latency.json")) else {}
    )
    out = []
    for f in suites:
        try:
            suite = _json(os.path.join(eval_dir, f))
            scores = {e["id"]: e["score"] for e in suite["examples"] if e.get("score") is not None}
            is_base = suite.get("adapter_source") == "base"
            variants = latency.get("variants", {})
            out.append(
                RunResult(
                    name=name,
                    dataset=suite["dataset"],
                    arm="base" if is_base else meta.get("arm") or name,
                    seed=int(meta.get("seed", 0)),
                    metric=suite["metric"],
                    scores=scores,
                    format_failures=int(suite.get("format_failures", 0)),
                    base_model=str(meta.get("base_model", "?")),
                    trainable_params=None if is_base else meta.get("trainable_params"),
                    peft_params=None if is_base else meta.get("peft_equivalent_params"),
                    tpot_unmerged=variants.get("unmerged", {}).get("tpot_ms_p95")
                    if not is_base
                    else variants.get("base", {}).get("tpot_ms_p95"),
                    tpot_merged=variants.get("merged", {}).get("tpot_ms_p95") if not is_base else None,
                )
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            return [], f"unreadable results ({f}: {type(e).__name__}: {e})"
    return out, None


def collect(root: str) -> tuple[list[RunResult], list[tuple[str, str]]]:
    results, missing = [], []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name in ("report", "joint"):  # joint: what a joint run's arms share
            continue
        found, why = read_run(path)
        if why:
            missing.append((name, why))
        results.extend(found)
    if results:  # one base model per report: the most common one
        common = collections.Counter(r.base_model for r in results).most_common(1)[0][0]
        for r in [r for r in results if r.base_model != common]:
            missing.append((r.name, f"base model {r.base_model} is not the report's ({common})"))
        results = [r for r in results if r.base_model == common]
    return results, missing


@dataclasses.dataclass
class Row:
    dataset: str
    arm: str
    metric: str
    seeds: int
    examples: int
    mean: float
    low: float
    high: float
    format_failures: float
    p_vs_best: float | None = None
    significant: bool | None = None
    trainable_params: int | None = None
    peft_params: int | None = None
    tpot_unmerged: float | None = None
    tpot_merged: float | None = None
    tpot_increase: float | None = None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def table(results: list[RunResult]) -> tuple[list[Row], dict]:
    """(rows, {(dataset, arm): per-example means}) over seeds, examples aligned by id."""
    groups = collections.defaultdict(list)
    for r in results:
        groups[(r.dataset, r.arm)].append(r)
    rows, per_example = [], {}
    for (dataset, arm), runs in sorted(groups.items()):
        ids = sorted(set.intersection(*(set(r.scores) for r in runs)))
        matrix = np.array([[r.scores[i] for i in ids] for r in runs]) if ids else np.zeros((len(runs), 0))
        mean, low, high = bootstrap_ci(matrix) if ids else (float("nan"),) * 3
        per_example[(dataset, arm)] = dict(zip(ids, matrix.mean(axis=0))) if ids else {}
        rows.append(
            Row(
                dataset,
                arm,
                runs[0].metric,
                len(runs),
                len(ids),
                mean,
                low,
                high,
                float(np.mean([r.format_failures for r in runs])),
                trainable_params=runs[0].trainable_params,
                peft_params=runs[0].peft_params,
                tpot_unmerged=_mean([r.tpot_unmerged for r in runs]),
                tpot_merged=_mean([r.tpot_merged for r in runs]),
            )
        )
    for dataset in sorted({r.dataset for r in rows}):
        arms = [r for r in rows if r.dataset == dataset and r.arm != "base"]
        if not arms:
            continue
        best = max(arms, key=lambda r: r.mean)
        cheapest = min((r.tpot_unmerged for r in arms if r.tpot_unmerged), default=None)
        for r in arms:
            a, b = per_example[(dataset, r.arm)], per_example[(dataset, best.arm)]
            shared = sorted(set(a) & set(b))
            r.p_vs_best = 1.0 if r is best else paired_p_value([a[i] for i in shared], [b[i] for i in shared])
            r.significant = r.p_vs_best < SIGNIFICANCE
            if cheapest and r.tpot_unmerged:
                r.tpot_increase = r.tpot_unmerged / cheapest - 1
    return rows, per_example


COLUMNS = [
    ("dataset", "dataset"),
    ("arm", "arm"),
    ("metric", "metric"),
    ("seeds", "seeds"),
    ("examples", "examples"),
    ("mean", "score"),
    ("low", "ci95_low"),
    ("high", "ci95_high"),
    ("format_failures", "format_failures"),
    ("p_vs_best", "p_vs_best"),
    ("significant", "worse_than_best_p<0.05"),
    ("trainable_params", "trainable_params"),
    ("peft_params", "peft_equivalent_params"),
    ("tpot_unmerged", "tpot_p95_ms_unmerged"),
    ("tpot_merged", "tpot_p95_ms_merged"),
    ("tpot_increase", "tpot_increase_vs_cheapest"),
]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for _, c in COLUMNS])
        for r in rows:
            w.writerow([_fmt(getattr(r, k)) for k, _ in COLUMNS])


def write_markdown(rows: list[Row], missing, path: str, root: str) -> None:
    lines = [f"# LoRA target-module ablation: {root}", ""]
    for dataset in sorted({r.dataset for r in rows}):
        lines += [f"## {dataset}", ""]
        lines.append("| arm | " + " | ".join(c for k, c in COLUMNS[2:]) + " |")
        lines.append("|---" * (len(COLUMNS) - 1) + "|")
        for r in [r for r in rows if r.dataset == dataset]:
            lines.append(f"| {r.arm} | " + " | ".join(_fmt(getattr(r, k)) for k, _ in COLUMNS[2:]) + " |")
        lines += ["", f"![{dataset}]({dataset}.png)", ""]
    lines += [
        "Score: mean over seeds; ci95: bootstrap over examples and seeds. p_vs_best: paired sign-flip",
        "permutation test against the dataset's best arm on the same examples. TPOT: decode time per",
        "token, p95, adapters unmerged (merged beside it); increase over the dataset's fastest arm.",
        "",
    ]
    if missing:
        lines += ["## Not in the table", ""] + [f"- {name}: {why}" for name, why in missing] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), sorted by x."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)
    ]
    return sorted(front, key=lambda i: points[i][0])


def plot(rows: list[Row], dataset: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in rows if r.dataset == dataset and r.arm != "base" and r.tpot_unmerged]
    base = [r for r in rows if r.dataset == dataset and r.arm == "base"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if arms:
        xs, ys = [r.tpot_unmerged for r in arms], [r.mean for r in arms]
        err = [[r.mean - r.low for r in arms], [r.high - r.mean for r in arms]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label="arm (95% CI)")
        for r in arms:
            ax.annotate(r.arm, (r.tpot_unmerged, r.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
    if base:
        ax.axhline(base[0].mean, color="gray", linestyle=":", label="base model")
    ax.set_xlabel("TPOT p95, adapters unmerged (ms)")
    ax.set_ylabel(arms[0].metric if arms else (base[0].metric if base else "score"))
    ax.set_title(f"{dataset}: score vs decode latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_hparams(results: list[RunResult], out_dir: str) -> None:
    """One TensorBoard run per (dataset, arm, seed) with its hparams and scores (HParams tab)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    for r in results:
        with tf.summary.create_file_writer(os.path.join(out_dir, f"{r.dataset}_{r.arm}_s{r.seed}")).as_default():
            hp.hparams({"dataset": r.dataset, "arm": r.arm, "seed": r.seed}, trial_id=r.name)
            tf.summary.scalar(f"score/{r.metric}", float(np.mean(list(r.scores.values()))) if r.scores else 0.0, step=0)
            if r.tpot_unmerged is not None:
                tf.summary.scalar("latency/tpot_ms_p95_unmerged", r.tpot_unmerged, step=0)


def build(root: str, out: str) -> dict:
    results, missing = collect(root)
    rows, _ = table(results)
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "report.csv"))
    write_markdown(rows, missing, os.path.join(out, "report.md"), root)
    datasets = sorted({r.dataset for r in rows})
    for dataset in datasets:
        plot(rows, dataset, os.path.join(out, f"{dataset}.png"))
    if results:
        write_hparams(results, os.path.join(out, "tensorboard"))
    return {"rows": rows, "missing": missing, "datasets": datasets}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="a sweep's root: one workdir per run")
    p.add_argument("--out", default=None, help="default: <root>/report")
    a = p.parse_args(argv)
    if not os.path.isdir(a.root):
        print(f"error: --root: no such directory: {a.root}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.root, "report")
    built = build(a.root, out)
    print(
        f"report: {len(built['rows'])} rows over {len(built['datasets'])} dataset(s), {len(built['missing'])} not in the table -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
