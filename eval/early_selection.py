"""The report's "Early selection" section: successive-halving runs (train.halving) beside the full
ablation of the same dataset and base.

A halving run is a joint run whose <run>/joint/halving.json records its rung decisions; its arms
stop at different steps, so they never enter the study's table. Per halving run (one per seed):
  - the winner (the arm left at the end) and its final score;
  - its cost: arm-steps (the steps each arm trained, summed) and wall-clock seconds (joint/summary.json
    "cost") relative to a full joint run of the same dataset and base (the same seed where there is one);
  - tied: whether the full ablation's corrected test (the table's p_vs_best) does not find the winner
    worse than the full ablation's best arm;
  - how the rung-1 ranking and the step-0 proxy ranking (joint/step0_proxy.json) agree with the full
    ablation's ranking (its arms' mean scores): `pairs`, the fraction of arm pairs both order the same
    way (pairs tied in either are left out), and Spearman's rho over the arms both rank.
Definitions of the halving and the proxy: lora_jax/run/halving.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from scipy import stats

from eval.metrics import LOWER_IS_BETTER
from eval.report_rows import BASE_ARM, Group, fmt

HALVING_RECORD = os.path.join("joint", "halving.json")
PROXY_FILE = os.path.join("joint", "step0_proxy.json")
JOINT_SUMMARY = os.path.join("joint", "summary.json")


@dataclasses.dataclass
class JointRun:
    """A joint run of a sweep's root, as the early-selection section reads it."""

    name: str
    dataset: str
    base_model: str
    seed: int
    arms: list[str]
    cost: dict | None  # joint/summary.json "cost": wall_s, train_wall_s, arm_steps
    halving: dict | None = None  # joint/halving.json (None: a full run)
    selected: list[str] = dataclasses.field(default_factory=list)
    arm_summaries: dict = dataclasses.field(default_factory=dict)  # arm -> its summary.json
    proxy: dict | None = None  # joint/step0_proxy.json
    scores: dict = dataclasses.field(default_factory=dict)  # arm -> (metric, mean final score) of finished arms
    steps: int | None = None  # train.total_steps: the finished arms' final step

    @property
    def winner(self) -> str | None:
        """The arm left at the end; with several left, the best by final score (all trained to the end)."""
        if len(self.selected) <= 1:
            return self.selected[0] if self.selected else None
        scored = [a for a in self.selected if a in self.scores and np.isfinite(self.scores[a][1])]
        if not scored:
            return self.selected[0]
        sign = -1.0 if self.scores[scored[0]][0] in LOWER_IS_BETTER else 1.0
        return max(scored, key=lambda a: (sign * self.scores[a][1], -self.selected.index(a)))

    def compares_with(self, full: JointRun) -> bool:
        """A full joint run this halving run's cost and ranking are compared with: same dataset, base and
        steps, and every arm of this run among its arms."""
        same = (full.dataset, full.base_model, full.steps) == (self.dataset, self.base_model, self.steps)
        return same and set(self.arms) <= set(full.arms)


def _read(path):
    with open(path) as f:
        return json.load(f)


def is_halving_run(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, HALVING_RECORD))


def read_joint_run(name: str, run_dir: str) -> JointRun | None:
    """A finished joint run (its joint/summary.json is written), else None. Unreadable files raise
    (OSError, ValueError, KeyError, TypeError): the caller lists the run under "Not in the table"."""
    if not os.path.exists(os.path.join(run_dir, JOINT_SUMMARY)):
        return None
    joint = _read(os.path.join(run_dir, JOINT_SUMMARY))
    summaries = {}
    for d in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, d, "summary.json")
        if d != "joint" and os.path.exists(path):
            s = _read(path)
            summaries[s["arm"]] = (d, s)
    if not summaries:
        return None
    first = next(iter(summaries.values()))[1]
    run = JointRun(
        name=name,
        dataset=first["dataset"],
        base_model=str(first.get("base_model", "?")),
        seed=int(first.get("seed", 0)),
        arms=list(joint["arms"]),
        cost=joint.get("cost"),
        arm_summaries={a: s for a, (_, s) in summaries.items()},
    )
    if is_halving_run(run_dir):
        run.halving = _read(os.path.join(run_dir, HALVING_RECORD))
        run.selected = list(joint.get("halving", {}).get("selected", []))
        if os.path.exists(os.path.join(run_dir, PROXY_FILE)):
            run.proxy = _read(os.path.join(run_dir, PROXY_FILE))
    done = [s["final_step"] for s in run.arm_summaries.values() if s.get("status") == "done"]
    run.steps = max(done) if done else None
    for arm, (d, s) in summaries.items():
        if s.get("status") != "done":
            continue
        eval_dir = os.path.join(run_dir, d, "eval")
        for f in sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []:
            if f.endswith(".json") and f not in ("latency.json", "results.json"):
                suite = _read(os.path.join(eval_dir, f))
                values = [e["score"] for e in suite["examples"] if e.get("score") is not None]
                run.scores[arm] = (suite["metric"], float(np.mean(values)) if values else float("nan"))
    return run


def agreement(full: dict[str, float], other: dict[str, float]) -> tuple[float | None, float | None, int]:
    """(fraction of arm pairs ordered the same way, Spearman's rho, arms compared) of two rankings given
    as goodness values (higher = better) over the arms both have; pairs tied in either are left out."""
    arms = [a for a in full if a in other]
    same = total = 0
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            d1, d2 = full[a] - full[b], other[a] - other[b]
            if d1 and d2:
                total += 1
                same += (d1 > 0) == (d2 > 0)
    rho = None
    if len(arms) >= 3:
        r = stats.spearmanr([full[a] for a in arms], [other[a] for a in arms]).statistic
        rho = None if np.isnan(r) else float(r)
    return (same / total if total else None), rho, len(arms)


def goodness(scores: dict[str, float], higher_is_better: bool) -> dict[str, float]:
    return {a: (v if higher_is_better else -v) for a, v in scores.items() if v is not None and np.isfinite(v)}


@dataclasses.dataclass
class SelectionRow:
    run: str
    seed: int
    winner: str
    winner_score: float | None
    tied: bool | None  # None: no full ablation row for the winner
    p_vs_best: float | None
    full_best: str | None
    arm_steps: int | None
    proxy_arm_steps: int | None  # the step-0 proxy's forward+backward passes (batches x arms), not in arm_steps
    resumed: bool  # either run was resumed: its wall-clock is only its last process's
    arm_steps_ratio: float | None
    wall_s: float | None
    wall_ratio: float | None
    rung1_pairs: float | None
    rung1_rho: float | None
    proxy_pairs: float | None
    proxy_rho: float | None
    proxy_ranking: list[str] | None
    pruned: dict  # arm -> (step, rung metric, its score)


def selection_rows(halving: list[JointRun], full_runs: list[JointRun], group: Group | None) -> list[SelectionRow]:
    """One row per halving run of a (dataset, base); `group`: the full ablation's table group, if any."""
    full_scores = {}
    if group is not None:
        means = {a: float(m) for a, m in zip(group.arms, group.observed) if a != BASE_ARM}
        full_scores = goodness(means, group.higher_is_better)
    rows_of = {r.arm: r for r in group.rows} if group is not None else {}
    best = max(full_scores, key=full_scores.get) if full_scores else None
    out = []
    for run in halving:
        winner = run.winner or "none"
        row = rows_of.get(winner)
        twins = [f for f in full_runs if run.compares_with(f)]
        twin = [f for f in twins if f.seed == run.seed] or twins
        full_cost = twin[0].cost if twin and twin[0].cost else None
        cost = run.cost or {}
        rungs = run.halving["rungs"]
        r1 = rungs[0] if rungs else None
        r1_pairs = r1_rho = p_pairs = p_rho = None
        if r1 and full_scores:
            r1_pairs, r1_rho, _ = agreement(full_scores, goodness(r1["scores"], r1["higher_is_better"]))
        if run.proxy and full_scores:
            p_pairs, p_rho, _ = agreement(full_scores, goodness(run.proxy["arms"], True))
        pruned = {a: (r["step"], r["metric"], r["scores"][a]) for r in rungs for a in r["pruned"]}
        out.append(
            SelectionRow(
                run=run.name,
                seed=run.seed,
                winner=winner,
                winner_score=run.scores.get(winner, (None, None))[1],
                tied=None if row is None else not row.significant,
                p_vs_best=None if row is None else row.p_vs_best,
                full_best=best,
                arm_steps=cost.get("arm_steps"),
                proxy_arm_steps=cost.get("proxy_arm_steps"),
                resumed=bool(cost.get("resumed_from")) or bool(full_cost and full_cost.get("resumed_from")),
                arm_steps_ratio=_ratio(cost.get("arm_steps"), full_cost and full_cost.get("arm_steps")),
                wall_s=cost.get("wall_s"),
                wall_ratio=_ratio(cost.get("wall_s"), full_cost and full_cost.get("wall_s")),
                rung1_pairs=r1_pairs,
                rung1_rho=r1_rho,
                proxy_pairs=p_pairs,
                proxy_rho=p_rho,
                proxy_ranking=run.proxy["ranking"] if run.proxy else None,
                pruned=pruned,
            )
        )
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _f(x, digits=3) -> str:
    return fmt(x, digits, missing="–")


COLUMNS = (
    "run", "seed", "winner", "winner score", "tied with the full best (p_vs_best)", "arm-steps (x full)",
    "wall-clock s (x full)", "rung 1: pairs as full", "rung 1: Spearman rho", "step-0 proxy: pairs as full",
    "step-0 proxy: Spearman rho",
)  # fmt: skip


def arms_table(run: JointRun, row: SelectionRow) -> list[str]:
    """A row per arm (and setting: an arm variant is an arm) of one halving run: the steps it trained,
    its score at every rung it reached, its final score (the arms left), its step-0 proxy value."""
    rungs = run.halving["rungs"]
    metric = next((m for m, _ in run.scores.values()), "final score")
    head = ["arm", "steps"] + [f"rung {i + 1} (step {r['step']}) {r['metric']}" for i, r in enumerate(rungs)]
    head += [metric, "step-0 proxy"]
    lines = [f"{run.name}:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    proxy = (run.proxy or {}).get("arms", {})
    total = run.halving["settings"]["steps"][-1]
    for arm in run.arms:
        stopped = row.pruned.get(arm, (None,))[0]
        summary = run.arm_summaries.get(arm, {})
        steps = stopped if stopped is not None else summary.get("final_step", total)
        cells = [arm, str(steps)] + [_f(r["scores"].get(arm), 4) if arm in r["scores"] else "" for r in rungs]
        cells += [_f(run.scores[arm][1], 4) if arm in run.scores else "pruned", _f(proxy.get(arm), 5)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def section_markdown(label: str, halving: list[JointRun], rows: list[SelectionRow], has_full: bool) -> list[str]:
    settings = halving[0].halving["settings"]
    lines = [
        f"## Early selection: {label}",
        "",
        f"Successive halving over one joint run per seed: rungs at {settings['rungs']} of the steps "
        f"(steps {settings['steps']}), the best 1/{settings['eta']} go on, ranked on the test split's "
        f"{'token loss' if settings['metric'] == 'loss' else 'suite score'}. "
        + (
            "Compared with the full ablation above (its arms' mean scores, its corrected test)."
            if has_full
            else "No full ablation of this dataset and base is in the report: nothing to compare with."
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    for r in rows:
        tied = "–" if r.tied is None else f"{_f(r.tied)} ({_f(r.p_vs_best, 4)})"
        steps = f"{_f(r.arm_steps)} ({_f(r.arm_steps_ratio)})" + (
            f" + proxy {r.proxy_arm_steps}" if r.proxy_arm_steps else ""
        )
        wall = f"{_f(r.wall_s, 0)} ({_f(r.wall_ratio)})" + (" resumed" if r.resumed else "")
        cells = [r.run, str(r.seed), r.winner, _f(r.winner_score, 4), tied, steps, wall]
        cells += [_f(r.rung1_pairs), _f(r.rung1_rho), _f(r.proxy_pairs), _f(r.proxy_rho)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for run, r in zip(halving, rows):
        lines += arms_table(run, r)
    lines += [
        "",
        "arm-steps: the steps each arm trained, summed over arms; x full: over a full joint run's of the same "
        "seed (same steps, its arms a superset); + proxy: the step-0 proxy's forward and backward passes "
        "(batches x arms, no update), not in the ratio. wall-clock: the whole run (model building, training, "
        "evaluation; the proxy included); resumed: only the last process's. pairs: the fraction of arm pairs "
        "ordered as the full ablation orders them; Spearman rho over every arm both rank. Rungs score the "
        "test split, the split the winner's final score is on: a validation split would not flatter it.",
        "",
    ]
    return lines


def early_selection(
    root: str, names_dirs: list[tuple[str, str]], groups: list[Group]
) -> tuple[list[str], list[tuple[str, str]], list[SelectionRow]]:
    """(markdown lines, (run, why) for runs it could not read, every row) over the sweep's joint runs
    (`names_dirs`: (name, directory) of each run directory directly under the root)."""
    halving, full, missing = [], [], []
    for name, path in names_dirs:
        try:
            run = read_joint_run(name, path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            if is_halving_run(path):
                missing.append((name, f"unreadable halving run ({type(e).__name__}: {e})"))
            continue
        if run is None:
            if is_halving_run(path):
                missing.append((name, "halving run not finished (no joint/summary.json)"))
            continue
        (halving if run.halving else full).append(run)
    lines, all_rows = [], []
    for dataset, base in sorted({(r.dataset, r.base_model) for r in halving}):
        runs = sorted([r for r in halving if (r.dataset, r.base_model) == (dataset, base)], key=lambda r: r.seed)
        twins = [r for r in full if (r.dataset, r.base_model) == (dataset, base)]
        group = next((g for g in groups if (g.dataset, g.base_model) == (dataset, base)), None)
        if group is not None and not [a for a in group.arms if a != BASE_ARM]:
            group = None
        rows = selection_rows(runs, twins, group)
        label = group.label if group is not None else dataset
        lines += section_markdown(label, runs, rows, group is not None)
        all_rows += rows
    return lines, missing, all_rows
