"""The statistics of the report: bootstrap confidence intervals and paired permutation tests.

`bootstrap_ci(scores)`: scores is [seeds, examples] (one row per seed, examples aligned). Each
resample draws seeds with replacement and, independently, examples with replacement, and takes
the mean of the selected cells; the interval is the percentile interval of those means (both
sources of noise the study's single runs could not separate: which examples, which seed).

`paired_p_value(a, b)`: two arms' per-example scores on the same examples (each the mean over the
arm's seeds). Null: the arms are exchangeable on every example, so each difference d_i = a_i - b_i
is as likely to have the other sign. Statistic |mean(d)|; p = the share of the 2^n sign flips
whose statistic is at least the observed one — enumerated exactly for n <= 16, else estimated
from `resamples` random flips as (hits + 1) / (resamples + 1).
"""

from __future__ import annotations

import itertools

import numpy as np

EXACT_UP_TO = 16


def bootstrap_ci(scores, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of scores [seeds, examples]."""
    x = np.asarray(scores, np.float64)
    if x.ndim == 1:
        x = x[None]
    s, n = x.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        rows = rng.integers(0, s, size=s)
        cols = rng.integers(0, n, size=n)
        means[r] = x[np.ix_(rows, cols)].mean()
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_p_value(a, b, resamples: int = 20000, seed: int = 0) -> float:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    if n == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean()) - 1e-12  # ties count as at least as extreme
    if n <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d / n) >= observed))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ d / n) >= observed))
    return (hits + 1) / (resamples + 1)
