"""The report's data: one run's results, a table row, a group of rows, the Pareto front and the
significance procedure (shared by report.py and report_summary.py, so neither imports the other)."""

from __future__ import annotations

import dataclasses

import numpy as np

SIGNIFICANCE = 0.05


PROCEDURE = (
    "max-T bootstrap comparison with the best (the best re-picked in every resample; familywise error "
    "about 5% or less in simulations with two seeds, eval/report_stats.py)"
)


BASE_ARM = "base"


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
    tpot_unmerged: float | None = None  # ms, p95 (the base model's for a base-model run)
    tpot_merged: float | None = None
    tpot_base: float | None = None  # the base model's, measured interleaved in the same run
    device: str | None = None  # latency.json's device kind
    device_count: int | None = None
    mesh: str | None = None  # the serving mesh, "data x fsdp x tensor"

    @property
    def tpot_ratio(self) -> float | None:
        """The within-run unmerged / base TPOT p95 (both measured interleaved in one process)."""
        if self.arm == BASE_ARM or not self.tpot_unmerged or not self.tpot_base:
            return None
        return self.tpot_unmerged / self.tpot_base


@dataclasses.dataclass
class Row:
    dataset: str
    base_model: str
    arm: str
    metric: str
    seeds: int | None
    examples: int | None
    mean: float
    low: float
    high: float
    format_failures: float | None = None
    rel_to_best: float | None = None
    rel_low: float | None = None
    rel_high: float | None = None
    p_vs_best: float | None = None
    significant: bool | None = None
    rel_p_vs_best: float | None = None
    rel_significant: bool | None = None
    trainable_params: int | None = None
    peft_params: int | None = None
    device: str | None = None
    device_count: str | None = None
    mesh: str | None = None
    tpot_unmerged: float | None = None
    tpot_merged: float | None = None
    tpot_ratio: float | None = None
    tpot_increase: float | None = None
    note: str | None = None


@dataclasses.dataclass
class Group:
    """One (dataset, base model) of the grid and its resamples (the arms', base model excluded)."""

    dataset: str
    base_model: str
    label: str
    metric: str
    higher_is_better: bool
    arms: list[str]
    observed: np.ndarray  # [arms]
    resampled: np.ndarray  # [resamples, arms]
    rows: list[Row]
    base_resampled: np.ndarray | None = None  # [resamples]: the base model's, where a run scored it
    examples: dict = dataclasses.field(default_factory=dict)  # arm -> examples its mean is over


def fmt(value, digits: int = 4, missing: str = "") -> str:
    """A table cell: `missing` for None or NaN, yes/no for a bool, floats to `digits` places."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pareto(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both (lower x; higher y, or lower y when
    lower is better), sorted by x."""
    s = 1.0 if higher_is_better else -1.0
    pts = [(x, s * y) for x, y in points]
    front = [
        i for i, (x, y) in enumerate(pts) if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in pts)
    ]
    return sorted(front, key=lambda i: points[i][0])
