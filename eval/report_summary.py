"""The study's own table: a row per arm, a column per dataset, the averages, TPOT p95 per base model.

Definitions (eval/report.py builds the per-dataset rows and resamples this reads):
- cell: the arm's score on one (dataset, base) — its mean over seeds — with the 95% bootstrap
  interval, marked ▼ when the arm is worse than that dataset's best arm (report_rows.PROCEDURE).
- compared arms and averaged datasets: the averaged datasets are those where every compared arm
  ran. The compared arms are given (--arms), else the largest complete block of the grid: the arm
  set whose common datasets make the most arms x datasets cells (at least two arms where any two
  share a dataset; ties: more datasets). An arm missing an averaged dataset is marked with the
  datasets it lacks and gets no average, never an average over fewer datasets.
- raw average: the mean over the averaged datasets of the arm's scores (no direction when the
  averaged metrics do not all rank the same way: then only the relative average is tested).
- relative average: the mean over the averaged datasets of the score relative to the dataset's best
  arm (report_stats.relative_to_best): score / best; for a lower-is-better metric 1 - (score -
  best), one minus the excess over the best in the metric's units, defined when the best is 0 (a
  likely rate or KL), where best / score would give NaN for the best arm and 0 for every other.
  The best among every arm that ran on the dataset. 1 = the best everywhere, 0.98 = 2% (a
  lower-is-better metric: 0.02) below the best on average. Arms rank by it, best first; an arm
  without one comes after those with one.
- intervals: the per-dataset bootstrap (report_stats.resample_means; datasets resampled
  independently), averaged resample by resample; for the relative average the dataset's best is
  re-picked in every resample. "Worse than the best on average" applies report_rows.PROCEDURE to these
  averaged resamples over the compared arms.
- TPOT per base model: the mean over the arm's runs on that base of TPOT p95 with adapters unmerged
  (the base model's own for the base row), on the base's most common latency device kind; beside
  it the mean of each run's own interleaved unmerged / base ratio. A dataset measured on another
  kind is left out of the column and listed under "Not in the table".
- summary plot: x = the mean over the averaged datasets of the arm's TPOT p95 (its per-dataset
  rows), y = the relative average with its interval, and the Pareto front.
"""

from __future__ import annotations

import collections
import csv
import dataclasses

import numpy as np

from eval.report_rows import BASE_ARM, PROCEDURE, SIGNIFICANCE, Group, Row, RunResult, pareto
from eval.report_stats import compare_with_best, interval, relative_to_best


class ArmsError(ValueError):
    """--arms names arms the report cannot compare."""


class UnknownArmError(ArmsError):
    """--arms names an arm no run in the report has."""


@dataclasses.dataclass
class Average:
    mean: float
    low: float
    high: float
    p_vs_best: float | None = None
    worse: bool | None = None


@dataclasses.dataclass
class ArmSummary:
    arm: str
    cells: dict  # group label -> Row
    lacks: list[str]  # averaged datasets the arm has no row for
    raw: Average | None = None
    rel: Average | None = None
    tpot: dict = dataclasses.field(default_factory=dict)  # base -> ms
    tpot_ratio: dict = dataclasses.field(default_factory=dict)  # base -> unmerged / base
    tpot_avg: float | None = None  # the summary plot's x


@dataclasses.dataclass
class Summary:
    labels: list[str]  # the dataset columns, in group order
    averaged: list[str]  # the labels averaged over
    compared: list[str]  # the arms averaged and compared
    raw_direction: str  # "higher" | "lower" | "mixed" | "" (nothing averaged)
    bases: list[str]
    base_devices: dict  # base -> the device kind its TPOT column is measured on
    arms: list[ArmSummary]
    notes: list = dataclasses.field(default_factory=list)  # (dataset, why) for "Not in the table"

    def average_rows(self) -> list[Row]:
        """report.csv's rows with dataset "average", one per arm."""
        out = []
        for a in self.arms:
            raw, rel = a.raw or Average(float("nan"), float("nan"), float("nan")), a.rel
            ratios = [a.cells[label].tpot_ratio for label in self.averaged if label in a.cells]
            out.append(
                Row(
                    "average",
                    "",
                    a.arm,
                    "+".join(sorted({a.cells[label].metric for label in self.averaged if label in a.cells})),
                    None,
                    None,
                    raw.mean,
                    raw.low,
                    raw.high,
                    rel_to_best=rel.mean if rel else None,
                    rel_low=rel.low if rel else None,
                    rel_high=rel.high if rel else None,
                    p_vs_best=raw.p_vs_best,
                    significant=raw.worse,
                    rel_p_vs_best=rel.p_vs_best if rel else None,
                    rel_significant=rel.worse if rel else None,
                    tpot_unmerged=a.tpot_avg,
                    tpot_ratio=float(np.mean(ratios)) if ratios and None not in ratios else None,
                    note=f"averaged over {'+'.join(self.averaged)}"
                    if a.raw
                    else f"not averaged: no {'+'.join(a.lacks)}",
                )
            )
        return out


def averaging_block(coverage: dict, labels: list[str], arms: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(compared arms, averaged labels) from coverage {arm: labels it ran on}; see the module doc."""
    if arms:
        unknown = [a for a in arms if a not in coverage]
        if unknown:
            raise UnknownArmError(
                f"--arms: no run has arm(s) {', '.join(unknown)}; arms: {', '.join(sorted(coverage))}"
            )
        common = set(labels).intersection(*(coverage[a] for a in arms))
        if not common:  # nothing to average over or compare on
            raise ArmsError(f"--arms: {', '.join(arms)} share no dataset")
        return list(arms), [label for label in labels if label in common]
    closures: set[frozenset] = set()  # every intersection of some arms' dataset sets
    for a in sorted(coverage):
        m = frozenset(coverage[a])
        closures |= {m} | {c & m for c in closures}
    best, best_key = ([], []), None
    for c in sorted(closures, key=lambda c: sorted(c)):
        members = sorted(a for a in coverage if c <= coverage[a])
        key = (len(c) > 0 and len(members) >= 2, len(members) * len(c), len(c))
        if c and (best_key is None or key > best_key):
            best, best_key = (members, [label for label in labels if label in c]), key
    return best


def _average(observed: np.ndarray, resampled: np.ndarray, k: int, p: np.ndarray | None) -> Average:
    low, high = interval(resampled[:, k])
    pk = None if p is None else float(p[k])
    return Average(float(observed[k]), low, high, pk, None if pk is None else pk < SIGNIFICANCE)


def _tpot_by_base(results: list[RunResult]) -> tuple[dict, dict, dict, list]:
    """({base: device kind}, {(base, arm): mean TPOT p95}, {(base, arm): mean unmerged/base},
    [(dataset, why)] for the datasets whose latency is on another kind than their base's most common
    one: their runs are left out of that base's column, and listed under "Not in the table")."""
    timed = [r for r in results if r.tpot_unmerged is not None]
    kinds = collections.defaultdict(collections.Counter)
    for r in timed:
        kinds[r.base_model][r.device or "?"] += 1
    device = {b: min(c, key=lambda k: (-c[k], k)) for b, c in kinds.items()}
    tpot, ratio = collections.defaultdict(list), collections.defaultdict(list)
    left_out = collections.defaultdict(set)  # (dataset, base) -> its kinds other than the base's
    for r in timed:
        if (r.device or "?") == device[r.base_model]:
            tpot[(r.base_model, r.arm)].append(r.tpot_unmerged)
            if r.tpot_ratio is not None:
                ratio[(r.base_model, r.arm)].append(r.tpot_ratio)
        else:
            left_out[(r.dataset, r.base_model)].add(r.device or "?")
    notes = [
        (
            dataset,
            f"latency on {'/'.join(sorted(other))} not in the TPOT p95 column of base {base}: that column "
            f"is measured on {device[base]}, the base's most common device kind; the {dataset} table has it",
        )
        for (dataset, base), other in sorted(left_out.items())
    ]
    tpot_mean = {k: float(np.mean(v)) for k, v in tpot.items()}
    return device, tpot_mean, {k: float(np.mean(v)) for k, v in ratio.items()}, notes


def summarize(groups: list[Group], results: list[RunResult], compare_arms: list[str] | None = None) -> Summary:
    """The arms x datasets table over the report's groups (one per (dataset, base))."""
    labels = [g.label for g in groups]
    by_label = {g.label: g for g in groups}
    coverage = collections.defaultdict(set)
    for g in groups:
        for a in g.arms:
            coverage[a].add(g.label)
    compared, averaged = averaging_block(dict(coverage), labels, compare_arms)
    directions = {by_label[label].higher_is_better for label in averaged}
    raw_direction = {0: "", 1: "higher" if True in directions else "lower"}.get(len(directions), "mixed")
    raw_obs = raw_res = rel_obs = rel_res = None
    if averaged and compared:
        cols = [[by_label[label].arms.index(a) for label in averaged] for a in compared]
        raw_obs = np.array([np.mean([by_label[lb].observed[i] for lb, i in zip(averaged, c)]) for c in cols])
        raw_res = np.stack([np.mean([by_label[lb].resampled[:, i] for lb, i in zip(averaged, c)], 0) for c in cols], 1)
        rel_o = {lb: relative_to_best(by_label[lb].observed, by_label[lb].higher_is_better) for lb in averaged}
        rel_r = {lb: relative_to_best(by_label[lb].resampled, by_label[lb].higher_is_better) for lb in averaged}
        rel_obs = np.array([np.mean([rel_o[lb][i] for lb, i in zip(averaged, c)]) for c in cols])
        rel_res = np.stack([np.mean([rel_r[lb][:, i] for lb, i in zip(averaged, c)], 0) for c in cols], 1)
    raw_p = rel_p = None
    if raw_obs is not None and len(compared) > 1:
        rel_p = compare_with_best(rel_obs, rel_res)
        if raw_direction != "mixed":
            raw_p = compare_with_best(raw_obs, raw_res, raw_direction == "higher")
    base_devices, tpot, ratio, notes = _tpot_by_base(results)
    bases = sorted({g.base_model for g in groups})
    names = sorted(coverage)

    def rank(a):  # best relative average first; an arm without one (NaN, not compared) after those with one
        rel = rel_obs[compared.index(a)] if a in compared and rel_obs is not None else np.nan
        return (a not in compared, bool(np.isnan(rel)), 0.0 if np.isnan(rel) else -rel, a)

    order = sorted(names, key=rank)
    arms = []
    has_base = any(r.arm == BASE_ARM for g in groups for r in g.rows)
    for a in order + ([BASE_ARM] if has_base else []):
        cells = {g.label: r for g in groups for r in g.rows if r.arm == a}
        s = ArmSummary(a, cells, [label for label in averaged if label not in cells])
        if a in compared and raw_obs is not None:
            k = compared.index(a)
            s.raw, s.rel = _average(raw_obs, raw_res, k, raw_p), _average(rel_obs, rel_res, k, rel_p)
        elif a == BASE_ARM and averaged and not s.lacks:  # shown, never compared
            s.raw, s.rel = _base_average(by_label, averaged)
        s.tpot = {b: tpot.get((b, a)) for b in bases}
        s.tpot_ratio = {b: ratio.get((b, a)) for b in bases}
        xs = [cells[label].tpot_unmerged for label in averaged if label in cells]
        s.tpot_avg = float(np.mean(xs)) if averaged and not s.lacks and None not in xs else None
        arms.append(s)
    return Summary(labels, averaged, compared, raw_direction, bases, base_devices, arms, notes)


def _base_average(by_label: dict, averaged: list[str]) -> tuple[Average, Average]:
    """The base model's averages: the same resamples, its relative score against each dataset's best arm."""
    raw_r = np.mean([by_label[lb].base_resampled for lb in averaged], 0)
    rel_r = []
    for lb in averaged:
        g = by_label[lb]
        both = np.concatenate([g.resampled, g.base_resampled[:, None]], 1)
        rel_r.append(relative_to_best(both, g.higher_is_better, np.arange(both.shape[1]) < len(g.arms))[:, -1])
    rows = [next(r for r in by_label[lb].rows if r.arm == BASE_ARM) for lb in averaged]
    raw = Average(float(np.mean([r.mean for r in rows])), *interval(raw_r))
    rel = Average(float(np.mean([r.rel_to_best for r in rows])), *interval(np.mean(rel_r, 0)))
    return raw, rel


def summary_points(summary: Summary) -> tuple[list[dict], list[int]]:
    """The summary plot's data: (points {arm, x: TPOT p95 ms, y: relative average, low, high} of the
    compared arms with a TPOT on every averaged dataset, the indices of the Pareto front)."""
    points = [
        {"arm": a.arm, "x": a.tpot_avg, "y": a.rel.mean, "low": a.rel.low, "high": a.rel.high}
        for a in summary.arms
        if a.arm in summary.compared and a.rel is not None and a.tpot_avg is not None
    ]
    return points, pareto([(p["x"], p["y"]) for p in points])


def _cell(mean, low, high, worse=None) -> str:
    if mean is None or np.isnan(mean):
        return ""
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" + (" ▼" if worse else "")


def _num(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def summary_markdown(summary: Summary) -> list[str]:
    """report.md's first section: the table, its caption and the summary plot."""
    if not summary.arms:
        return ["No results yet.", ""]
    head = ["arm", *summary.labels, "average", "relative to best"]
    for b in summary.bases:
        head += [f"TPOT p95 ms ({b}, {summary.base_devices.get(b, '?')})", f"unmerged / base ({b})"]
    lines = ["## Arms x datasets", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for a in summary.arms:
        cells = [
            _cell(r.mean, r.low, r.high, r.significant) if (r := a.cells.get(label)) else "— (not run)"
            for label in summary.labels
        ]
        if a.raw:
            averages = [
                _cell(a.raw.mean, a.raw.low, a.raw.high, a.raw.worse),
                _cell(a.rel.mean, a.rel.low, a.rel.high, a.rel.worse),
            ]
        else:
            why = f"— (no {', '.join(a.lacks)})" if a.lacks else "— (not compared)"
            averages = [why, why]
        latency = [x for b in summary.bases for x in (_num(a.tpot[b], 2), _num(a.tpot_ratio[b], 3))]
        lines.append("| " + " | ".join([a.arm, *cells, *averages, *latency]) + " |")
    n, m = len(summary.averaged), len(summary.compared)
    lines += [
        "",
        f"Cells: mean over seeds [95% bootstrap interval over examples and seeds]; ▼: worse than the best "
        f"arm at p < {SIGNIFICANCE} by the {PROCEDURE}. Average: the raw mean of the per-dataset scores over "
        f"the {n} dataset(s) where all {m} compared arms ran ({', '.join(summary.averaged) or 'none'}); "
        "relative to best: the mean over the same datasets of score / that dataset's best arm's score "
        "(1 - (score - best) when lower is better: the excess over the best in the metric's units), 1 = best. "
        "An arm missing one of them is marked, not averaged. "
        "Intervals and ▼ of both averages: the same bootstrap, averaged resample by resample, the best "
        "re-picked in every resample"
        + (
            "; the raw average mixes metrics ranked both ways, so only the relative one is tested. "
            if summary.raw_direction == "mixed"
            else ". "
        )
        + "TPOT p95: decode time per token with the adapters unmerged, mean over the arm's runs on that "
        "base on its most common device kind (named); unmerged / base: each run's own interleaved ratio.",
        "",
        "![average score vs TPOT p95](summary.png)",
        "",
    ]
    return lines


def write_summary_csv(summary: Summary, path: str) -> None:
    """summary.csv: the table of report.md, one number per column."""
    head = ["arm"]
    for label in summary.labels:
        head += [label, f"{label}_ci95_low", f"{label}_ci95_high", f"{label}_worse_than_best"]
    head += ["average", "average_ci95_low", "average_ci95_high", "average_worse_than_best"]
    head += ["relative_to_best", "relative_ci95_low", "relative_ci95_high", "relative_worse_than_best"]
    head += ["averaged_over", "not_averaged_lacks"]
    for b in summary.bases:
        head += [f"tpot_p95_ms_unmerged[{b}]", f"tpot_p95_unmerged_over_base[{b}]", f"latency_device[{b}]"]

    def num(x):
        return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.6g}"

    def flag(x):
        return "" if x is None else ("yes" if x else "no")

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for a in summary.arms:
            row = [a.arm]
            for label in summary.labels:
                r = a.cells.get(label)
                row += [num(r.mean), num(r.low), num(r.high), flag(r.significant)] if r else ["not run", "", "", ""]
            for avg in (a.raw, a.rel):
                row += [num(avg.mean), num(avg.low), num(avg.high), flag(avg.worse)] if avg else ["", "", "", ""]
            row += ["+".join(summary.averaged) if a.raw else "", "+".join(a.lacks)]
            for b in summary.bases:
                row += [num(a.tpot[b]), num(a.tpot_ratio[b]), summary.base_devices.get(b, "")]
            w.writerow(row)


def plot_summary(summary: Summary, path: str) -> None:
    """summary.png: relative average score vs TPOT p95 over the averaged datasets, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, front = summary_points(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if points:
        xs, ys = [p["x"] for p in points], [p["y"] for p in points]
        err = [[p["y"] - p["low"] for p in points], [p["high"] - p["y"] for p in points]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label="arm (95% CI)")
        for p in points:
            ax.annotate(p["arm"], (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("TPOT p95, adapters unmerged (ms), mean over the datasets")
    ax.set_ylabel("score relative to each dataset's best arm, mean")
    ax.set_title(f"{len(summary.averaged)} datasets: average score vs decode latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
