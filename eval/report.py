"""The study's table from a sweep's root directory: arms x datasets, with intervals, tests, latency.

    python -m eval.report --root=/tmp/sweeps/study [--out=<root>/report] [--arms=oproj,oproj_fc2]

Reads only the JSON files in the run workdirs under --root (summary.json, eval/<suite>.json,
eval/latency.json, eval/results.json), never a model, so a report can be rebuilt anywhere from a
copied results folder. Runs are grouped by (dataset, base model): the text datasets on one base and
the image datasets on a vision base are all in one report. Writes to --out:
  report.md — first the study's table (arms x datasets, `summarize`): a row per arm, a column per
      dataset (mean over seeds, 95% interval), the average over datasets both raw and relative to
      each dataset's best arm, and per base model the TPOT p95 and the within-run unmerged / base
      ratio; then one table per (dataset, base): format failures, the comparison with the best arm,
      trainable parameters (ours and PEFT's separate q/k/v, gate/up adapters), the latency device,
      device count and mesh, TPOT p95 unmerged and merged, unmerged / base, the increase over the
      fastest arm; a base-model row where a run scored the base (mode=eval, no adapter);
  summary.csv — the study's table as in report.md; report.csv — one row per (dataset, base, arm),
      and one row per arm with dataset "average";
  summary.png — average score (relative to the best) vs TPOT p95, the Pareto front;
  <dataset>.png — the metric vs TPOT p95 (unmerged), one point per arm with its interval, the
      Pareto front (no arm both faster and better), the base model as a horizontal line;
  tensorboard/ — one hparams run per (dataset, arm, seed) with its metric and TPOT.
Runs without results or with unreadable ones, diverged runs ("diverged at step N (rule, value)",
from their summary.json), failed runs (their launch.log's last error line), the latency of runs
measured on another device kind than most runs of their dataset, and datasets left out of a base's
TPOT column (measured on another kind than the base's most common) are listed under "Not in the
table".
Metrics in eval.metrics.LOWER_IS_BETTER rank lower-first everywhere.
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

from eval import metrics
from eval.early_selection import early_selection, is_halving_run
from eval.events import EventWriter
from eval.report_rows import BASE_ARM, PROCEDURE, SIGNIFICANCE, Group, Row, RunResult, fmt, pareto
from eval.report_stats import (
    RESAMPLES,
    compare_with_best,
    interval,
    observed_means,
    relative_to_best,
    resample_means,
)
from eval.report_summary import ArmsError, plot_summary, summarize, summary_markdown, write_summary_csv


def _json(path):
    with open(path) as f:
        return json.load(f)


def _mesh(mesh) -> str | None:
    if not isinstance(mesh, dict):
        return None
    return "x".join(str(mesh.get(axis, "?")) for axis in ("data", "fsdp", "tensor"))


def diverged_note(summary) -> str | None:
    """ "diverged at step N (rule, value)" for a summary.json whose status is "diverged" (the step,
    rule and value under "divergence", or at the top level), else None."""
    if not isinstance(summary, dict) or summary.get("status") != "diverged":
        return None
    d = summary.get("divergence") if isinstance(summary.get("divergence"), dict) else summary
    value = d.get("value", "?")
    value = f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    kept = summary.get("last_checkpoint_step")
    step = d.get("step", summary.get("final_step", "?"))
    note = f"diverged at step {step} ({d.get('rule', '?')}, {value})"
    return note + (f"; last checkpoint at step {kept}" if kept is not None else "; no checkpoint kept")


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def _latency(latency, is_base: bool) -> dict:
    """latency.json's fields the report reads, checked: {unmerged, merged, base, device, count, mesh}."""
    latency = _object(latency, "the file")
    variants = _object(latency.get("variants", {}), "variants")

    def p95(name):
        v = _object(variants.get(name, {}), f"variants.{name}").get("tpot_ms_p95")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"variants.{name}.tpot_ms_p95 is {v!r}, not a number")
        return v

    base, count = p95("base"), latency.get("device_count")
    return {
        "unmerged": base if is_base else p95("unmerged"),
        "merged": None if is_base else p95("merged"),
        "base": base,
        "device": str(latency["device"]) if latency.get("device") is not None else None,
        "count": int(count) if count is not None else None,
        "mesh": _mesh(latency.get("mesh")),
    }


def read_run(run_dir: str) -> tuple[list[RunResult], str | None]:
    """(results of the run — one per suite file —, or why it has none: diverged, failed, no or
    unreadable results)."""
    name = os.path.basename(run_dir.rstrip("/"))
    eval_dir = os.path.join(run_dir, "eval")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):  # a diverged run exported nothing; its summary says where it stopped
        try:
            diverged = diverged_note(_json(summary_path))
        except (OSError, ValueError) as e:
            return [], f"unreadable results (summary.json: {type(e).__name__}: {e})"
        if diverged:
            return [], diverged
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
    out = []
    reading = "results.json"
    try:
        meta = {}
        for path in (os.path.join(eval_dir, "results.json"), summary_path):
            if os.path.exists(path):  # mode=eval's results, else training's summary
                reading = os.path.basename(path)
                meta = _object(_json(path), "the file")
                break
        latency_path = os.path.join(eval_dir, "latency.json")
        reading = "latency.json"
        latency = _json(latency_path) if os.path.exists(latency_path) else {}
        for f in suites:
            reading = f
            suite = _object(_json(os.path.join(eval_dir, f)), "the file")
            scores = {e["id"]: e["score"] for e in suite["examples"] if e.get("score") is not None}
            is_base = suite.get("adapter_source") == "base"
            reading = "latency.json"
            lat = _latency(latency, is_base)
            reading = f
            out.append(
                RunResult(
                    name=name,
                    dataset=suite["dataset"],
                    arm=BASE_ARM if is_base else meta.get("arm") or name,
                    seed=int(meta.get("seed", 0)),
                    metric=suite["metric"],
                    scores=scores,
                    format_failures=int(suite.get("format_failures", 0)),
                    base_model=str(meta.get("base_model", "?")),
                    trainable_params=None if is_base else meta.get("trainable_params"),
                    peft_params=None if is_base else meta.get("peft_equivalent_params"),
                    tpot_unmerged=lat["unmerged"],
                    tpot_merged=lat["merged"],
                    tpot_base=lat["base"],
                    device=lat["device"],
                    device_count=lat["count"],
                    mesh=lat["mesh"],
                )
            )
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
        return [], f"unreadable results ({reading}: {type(e).__name__}: {e})"
    return out, None


def _most_common(values) -> str | None:
    counts = collections.Counter(values)
    return min(counts, key=lambda v: (-counts[v], str(v))) if counts else None  # ties: the first by name


def _latency_line(r: RunResult) -> str:
    ratio = f", unmerged/base {r.tpot_ratio:.3f}" if r.tpot_ratio else ""
    merged = f", merged {r.tpot_merged:.2f} ms" if r.tpot_merged else ""
    return f"TPOT p95 {'base' if r.arm == BASE_ARM else 'unmerged'} {r.tpot_unmerged:.2f} ms{merged}{ratio}"


def one_device_kind(results: list[RunResult]) -> tuple[list[RunResult], list[tuple[str, str]]]:
    """Absolute TPOT is compared only within one device kind per (dataset, base): the most common
    one among its runs with a latency. Other runs keep their scores; their latency leaves the table
    (returned as (run, why) lines for "Not in the table")."""
    kinds = collections.defaultdict(list)
    for r in results:
        if r.tpot_unmerged is not None:
            kinds[(r.dataset, r.base_model)].append(r.device or "?")
    main = {key: _most_common(v) for key, v in kinds.items()}
    out, notes = [], []
    for r in results:
        kind = main.get((r.dataset, r.base_model))
        if r.tpot_unmerged is not None and (r.device or "?") != kind:
            notes.append(
                (
                    r.name,
                    f"latency on {r.device or '?'} not compared ({_latency_line(r)}): most {r.dataset} runs "
                    f"on this base measured on {kind}; its scores are in the table",
                )
            )
            r = dataclasses.replace(r, tpot_unmerged=None, tpot_merged=None, tpot_base=None)
        out.append(r)
    return out, notes


def top_dirs(root: str) -> list[tuple[str, str]]:
    """(name, directory) of each run directory directly under a sweep's root; the root itself when it
    is one joint run's workdir (it holds joint/)."""
    if os.path.isdir(os.path.join(root, "joint")):
        return [(os.path.basename(os.path.normpath(root)), root)]
    names = [n for n in sorted(os.listdir(root)) if n not in ("report", "joint")]  # joint: what its arms share
    return [(n, os.path.join(root, n)) for n in names if os.path.isdir(os.path.join(root, n))]


def run_dirs(root: str) -> list[tuple[str, str]]:
    """(name, directory) of each run under a sweep's root: a run's workdir, or the arms of a joint run
    (<run>/<arm's run>, beside <run>/joint, which they share); a joint run without arm directories
    (it failed before training) is one run, read for its error. A successive-halving run's arms trained
    for different steps: they are not runs of the table (see the Early selection section)."""
    if is_halving_run(root):
        return []
    out = []
    for name, path in top_dirs(root):
        if is_halving_run(path):
            continue
        arms = []
        if os.path.isdir(os.path.join(path, "joint")):
            arms = [a for a in sorted(os.listdir(path)) if a not in ("report", "joint")]
            arms = [(f"{name}/{a}", os.path.join(path, a)) for a in arms if os.path.isdir(os.path.join(path, a))]
        out.extend(arms or [(name, path)])
    return out


def collect(root: str) -> tuple[list[RunResult], list[tuple[str, str]]]:
    """(every run's results, (run, why) for runs or latencies not in the table)."""
    results, missing = [], []
    for name, path in run_dirs(root):
        found, why = read_run(path)
        if why:
            missing.append((name, why))
        results.extend(found)
    results, notes = one_device_kind(results)
    return results, missing + notes


def higher_is_better(metric: str) -> bool:
    return metric not in metrics.LOWER_IS_BETTER


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _joined(values) -> str | None:
    """The distinct values of runs, "?" for a file that does not record it; None without latency."""
    values = ["?" if v is None else str(v) for v in values]
    return "/".join(sorted(set(values))) if values else None


def table(results: list[RunResult]) -> tuple[list[Row], list[Group]]:
    """(rows, groups): one row per (dataset, base, arm), over seeds, examples aligned by id."""
    by_group = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        by_group[(r.dataset, r.base_model)][r.arm].append(r)
    bases_of = collections.Counter(dataset for dataset, _ in by_group)
    rows, groups = [], []
    for dataset, base in sorted(by_group, key=lambda k: (k[1], k[0])):
        runs_of = by_group[(dataset, base)]
        names = sorted(a for a in runs_of if a != BASE_ARM) + ([BASE_ARM] if BASE_ARM in runs_of else [])
        ids_of = {a: set.intersection(*(set(r.scores) for r in runs_of[a])) for a in names}
        union = sorted(set().union(*ids_of.values()))
        matrices = [
            np.array([[r.scores[i] if i in ids_of[a] else np.nan for i in union] for r in runs_of[a]]).reshape(
                len(runs_of[a]), len(union)
            )
            for a in names
        ]
        metric = runs_of[names[0]][0].metric
        hib = higher_is_better(metric)
        arm_mask = np.array([a != BASE_ARM for a in names])
        if union:  # a seed per group: datasets are resampled independently of each other
            observed = observed_means(matrices)
            resampled = resample_means(matrices, seed=len(groups), seeded=arm_mask)  # the base: no seed
        else:
            observed, resampled = np.full(len(names), np.nan), np.full((RESAMPLES, len(names)), np.nan)
        rel, rel_resampled = relative_to_best(observed, hib, arm_mask), relative_to_best(resampled, hib, arm_mask)
        p = np.ones(len(names))
        if arm_mask.any() and union:
            p[arm_mask] = compare_with_best(observed[arm_mask], resampled[:, arm_mask], hib)
        group_rows = []
        for k, a in enumerate(names):
            runs = runs_of[a]
            timed = [r for r in runs if r.tpot_unmerged is not None]
            is_arm = a != BASE_ARM
            group_rows.append(
                Row(
                    dataset,
                    base,
                    a,
                    metric,
                    len(runs),
                    len(ids_of[a]),
                    float(observed[k]),
                    *interval(resampled[:, k]),
                    format_failures=float(np.mean([r.format_failures for r in runs])),
                    rel_to_best=float(rel[k]),
                    rel_low=interval(rel_resampled[:, k])[0],
                    rel_high=interval(rel_resampled[:, k])[1],
                    p_vs_best=float(p[k]) if is_arm else None,
                    significant=bool(p[k] < SIGNIFICANCE) if is_arm else None,
                    trainable_params=runs[0].trainable_params,
                    peft_params=runs[0].peft_params,
                    device=_joined(r.device for r in timed),
                    device_count=_joined(r.device_count for r in timed),
                    mesh=_joined(r.mesh for r in timed),
                    tpot_unmerged=_mean([r.tpot_unmerged for r in runs]),
                    tpot_merged=_mean([r.tpot_merged for r in runs]),
                    tpot_ratio=_mean([r.tpot_ratio for r in runs]),
                )
            )
        cheapest = min((r.tpot_unmerged for r in group_rows if r.arm != BASE_ARM and r.tpot_unmerged), default=None)
        for r in group_rows:
            if r.arm != BASE_ARM and cheapest and r.tpot_unmerged:
                r.tpot_increase = r.tpot_unmerged / cheapest - 1
        label = dataset if bases_of[dataset] == 1 else f"{dataset} [{base}]"
        arms = [a for a in names if a != BASE_ARM]
        groups.append(
            Group(
                dataset,
                base,
                label,
                metric,
                hib,
                arms,
                observed[arm_mask],
                resampled[:, arm_mask],
                group_rows,
                resampled[:, -1] if BASE_ARM in names else None,
                {a: len(ids_of[a]) for a in names},
            )
        )
        rows.extend(group_rows)
    return rows, groups


COLUMNS = [
    ("dataset", "dataset"),
    ("arm", "arm"),
    ("base_model", "base_model"),
    ("metric", "metric"),
    ("seeds", "seeds"),
    ("examples", "examples"),
    ("mean", "score"),
    ("low", "ci95_low"),
    ("high", "ci95_high"),
    ("rel_to_best", "relative_to_best"),
    ("rel_low", "relative_ci95_low"),
    ("rel_high", "relative_ci95_high"),
    ("format_failures", "format_failures"),
    ("p_vs_best", "p_vs_best"),
    ("significant", "worse_than_best_p<0.05"),
    ("rel_p_vs_best", "relative_p_vs_best"),
    ("rel_significant", "relative_worse_than_best_p<0.05"),
    ("trainable_params", "trainable_params"),
    ("peft_params", "peft_equivalent_params"),
    ("device", "latency_device"),
    ("device_count", "latency_device_count"),
    ("mesh", "latency_mesh_data_x_fsdp_x_tensor"),
    ("tpot_unmerged", "tpot_p95_ms_unmerged"),
    ("tpot_merged", "tpot_p95_ms_merged"),
    ("tpot_ratio", "tpot_p95_unmerged_over_base"),
    ("tpot_increase", "tpot_increase_vs_cheapest"),
    ("note", "note"),
]
_DATASET_COLUMNS = [
    c for c in COLUMNS[3:] if c[0] not in ("rel_low", "rel_high", "rel_p_vs_best", "rel_significant", "note")
]


_fmt = fmt  # the report's cells: 4 places, empty when missing


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for _, c in COLUMNS])
        for r in rows:
            w.writerow([_fmt(getattr(r, k)) for k, _ in COLUMNS])


def write_markdown(summary, groups: list[Group], missing, path: str, root: str, early: list[str] = ()) -> None:
    """report.md: the study's table (summary: eval.report_summary.Summary), then one table per group,
    then `early` (the Early selection sections)."""

    lines = [f"# LoRA target-module ablation: {root}", ""]
    lines += summary_markdown(summary)
    for g in groups:
        direction = "higher is better" if g.higher_is_better else "lower is better"
        lines += [f"## {g.label}", "", f"Base model `{g.base_model}`; metric `{g.metric}` ({direction}).", ""]
        cols = [c for c in _DATASET_COLUMNS if c[0] != "base_model"]
        lines.append("| arm | " + " | ".join(c for _, c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for r in g.rows:
            lines.append(f"| {r.arm} | " + " | ".join(_fmt(getattr(r, k)) for k, _ in cols) + " |")
        counts = sorted(set(g.examples.values()))
        if len(counts) > 1:  # the means are over different examples; say so where the numbers are
            per_arm = ", ".join(f"{a}: {k}" for a, k in g.examples.items())
            lines += ["", f"The arms' means are over different examples ({per_arm}): each over its own."]
        lines += ["", f"![{g.label}]({_png(g)})", ""]
    lines += [
        "Score: mean over seeds; ci95: bootstrap over examples and seeds (eval/report_stats.py).",
        "relative_to_best: score / the best arm's; when lower is better 1 - (score - best), one minus the",
        "excess over the best in the metric's units (a best of 0 is likely); 1 = best.",
        f"p_vs_best: {PROCEDURE}, against the dataset's best arm. Each arm's mean is over the examples all",
        "its seeds scored (`examples`); every resample draws the examples once for all arms, so arms are",
        "paired on the examples they share.",
        "TPOT: decode time per token, p95, adapters unmerged (merged beside it), on the latency device",
        "(most of the dataset's runs; others under Not in the table); unmerged_over_base: the run's own",
        "interleaved ratio; increase: over the dataset's fastest arm.",
        "",
    ]
    lines += list(early)
    if missing:
        lines += ["## Not in the table", ""] + [f"- {name}: {why}" for name, why in missing] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _png(g: Group) -> str:
    return f"{g.dataset}.png" if g.label == g.dataset else f"{g.dataset}_{g.base_model}.png"


def plot(group: Group, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in group.rows if r.arm != BASE_ARM and r.tpot_unmerged]
    base = [r for r in group.rows if r.arm == BASE_ARM]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if arms:
        xs, ys = [r.tpot_unmerged for r in arms], [r.mean for r in arms]
        err = [[r.mean - r.low for r in arms], [r.high - r.mean for r in arms]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label="arm (95% CI)")
        for r in arms:
            ax.annotate(r.arm, (r.tpot_unmerged, r.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto(list(zip(xs, ys)), group.higher_is_better)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
    if base:
        ax.axhline(base[0].mean, color="gray", linestyle=":", label="base model")
    direction = "higher" if group.higher_is_better else "lower"
    ax.set_xlabel("TPOT p95, adapters unmerged (ms)")
    ax.set_ylabel(f"{group.metric} ({direction} is better)")
    ax.set_title(f"{group.label}: score vs decode latency")
    if arms or base:  # runs without latency leave the plot empty
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_hparams(results: list[RunResult], out_dir: str) -> None:
    """One TensorBoard run per (dataset, base, arm, seed) with its hparams and scores (HParams tab)."""
    bases_of = collections.defaultdict(set)
    for r in results:
        bases_of[r.dataset].add(r.base_model)
    for r in results:
        run = f"{r.dataset}_{r.arm}_s{r.seed}" + (f"_{r.base_model}" if len(bases_of[r.dataset]) > 1 else "")
        writer = EventWriter(os.path.join(out_dir, run), log_scalars=False)
        writer.write_hparams(
            {"dataset": r.dataset, "arm": r.arm, "seed": r.seed, "base_model": r.base_model}, trial_id=r.name
        )
        scores = {f"score/{r.metric}": float(np.mean(list(r.scores.values()))) if r.scores else 0.0}
        if r.tpot_unmerged is not None:
            scores["latency/tpot_ms_p95_unmerged"] = r.tpot_unmerged
        writer.write_scalars(0, scores)
        writer.close()


def build(root: str, out: str, compare_arms: list[str] | None = None) -> dict:

    results, missing = collect(root)
    rows, groups = table(results)
    summary = summarize(groups, results, compare_arms)
    early, early_missing, selection = early_selection(root, top_dirs(root), groups)
    missing = missing + summary.notes + early_missing
    os.makedirs(out, exist_ok=True)
    write_csv(rows + summary.average_rows(), os.path.join(out, "report.csv"))
    write_summary_csv(summary, os.path.join(out, "summary.csv"))
    write_markdown(summary, groups, missing, os.path.join(out, "report.md"), root, early)
    if selection:
        write_selection_csv(selection, os.path.join(out, "early_selection.csv"))
    for g in groups:
        plot(g, os.path.join(out, _png(g)))
    if groups:
        plot_summary(summary, os.path.join(out, "summary.png"))
    if results:
        write_hparams(results, os.path.join(out, "tensorboard"))
    datasets = sorted({g.dataset for g in groups})
    return {
        "rows": rows,
        "missing": missing,
        "datasets": datasets,
        "summary": summary,
        "groups": groups,
        "early_selection": selection,
    }


def write_selection_csv(selection, path: str) -> None:
    """early_selection.csv: one row per successive-halving run (eval/early_selection.py)."""
    fields = [f.name for f in dataclasses.fields(selection[0]) if f.name not in ("pruned", "proxy_ranking")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + ["proxy_ranking", "pruned"])
        for r in selection:
            pruned = ";".join(f"{a}@{s}" for a, (s, _, _) in r.pruned.items())
            ranking = ";".join(r.proxy_ranking or [])
            w.writerow([_fmt(getattr(r, k)) for k in fields] + [ranking, pruned])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="a sweep's root: one workdir per run")
    p.add_argument("--out", default=None, help="default: <root>/report")
    p.add_argument(
        "--arms",
        default=None,
        help="comma-separated arms to average and compare (default: the largest complete arms x datasets block)",
    )
    a = p.parse_args(argv)
    if not os.path.isdir(a.root):
        print(f"error: --root: no such directory: {a.root}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.root, "report")
    arms = [x for x in a.arms.split(",") if x] if a.arms else None

    try:
        built = build(a.root, out, arms)
    except ArmsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"report: {len(built['rows'])} rows over {len(built['datasets'])} dataset(s), {len(built['missing'])} not in the table -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
