"""The statistics of the report: one bootstrap for every interval, and the comparison with the best arm.

`resample_means(matrices)`: the arms of one dataset, each [seeds, examples] on one shared example
axis (NaN where an arm has no score for an example). Both sources of noise the study's single runs
could not separate enter, which examples and which seed: each resample draws the examples with
replacement once for all arms (so arms stay paired on the same examples) and takes each arm's mean
of its per-example means over seeds; to that it adds the arm's seed shift, the mean of
(seed's mean - arm's mean) over its seeds drawn with replacement, independently per arm. (Drawing
seeds and examples of the cells independently instead counts the seed x example noise about three
times: its intervals were far too wide. The seed shift still counts it (1 - 1/seeds) times once
more: slightly conservative.) Every interval of the report (an arm on a dataset, the averages over
datasets, the relative scores) is a percentile interval of these resamples, or of functions of them.

`bootstrap_ci(scores)`: (mean, low, high) of one arm's [seeds, examples] from the same resampling.

`compare_with_best(observed, resampled)`: which arms are worse than the best one, when the best
was picked after seeing the data. Gap of arm i: best mean - mean_i (higher is better; mirrored for
lower-is-better metrics). Null: all arms equal. In each resample the means are centred on the
observed ones (e*_j = m*_j - m_j, which imposes the null), the best is re-picked among them, and the
statistic is the largest gap to it over all arms, max_j e*_j - min_i e*_i. p_i = (resamples whose
statistic >= gap_i, + 1) / (resamples + 1): a single-step max-T bootstrap comparison with the best,
so picking the best and testing about eight arms together keep the familywise error at alpha.

`paired_p_value(a, b)`: two arms' per-example scores on the same examples. Null: the arms are
exchangeable on every example, so each difference d_i = a_i - b_i is as likely to have the other
sign. Statistic |mean(d)|; p = the share of the 2^n sign flips whose statistic is at least the
observed one — enumerated exactly for n <= 16, else estimated from `resamples` random flips as
(hits + 1) / (resamples + 1). It tests one pair; against a best arm picked from the same data it
flags far more than alpha of equal arms (tests/test_report_grid.py simulates it), so the report
uses `compare_with_best` instead.
"""

from __future__ import annotations

import itertools

import numpy as np

EXACT_UP_TO = 16
RESAMPLES = 2000
_CELLS_PER_CHUNK = 4_000_000  # resamples x examples held at once


def _counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """[resamples, n]: how often each of n items is drawn in n draws with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + np.arange(resamples)[:, None] * n
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def resample_means(matrices: list, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, arms]: each arm's mean in each resample. matrices[a]: [seeds_a, examples]
    (one example axis for all arms, NaN = no score), or [examples] for one seed."""
    xs = [np.atleast_2d(np.asarray(m, np.float64)) for m in matrices]
    n = xs[0].shape[1]
    if any(x.shape[1] != n for x in xs):
        raise ValueError(f"arms have different example axes: {[x.shape for x in xs]}")
    valid = [~np.isnan(x).any(axis=0) for x in xs]  # an arm's examples: those all its seeds scored
    per_example = [np.where(v, x, 0.0).mean(axis=0) for x, v in zip(xs, valid)]
    shifts = []  # [seeds_a]: each seed's mean minus the arm's mean, on the arm's examples
    for x, v in zip(xs, valid):
        seed_means = x[:, v].mean(axis=1) if v.any() else np.zeros(x.shape[0])
        shifts.append(seed_means - seed_means.mean())
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(xs)))
    chunk = max(1, _CELLS_PER_CHUNK // max(n, 1))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        examples = _counts(rng, r, n)  # shared by the arms: they stay paired
        for a in range(len(xs)):
            weight = examples * valid[a]
            seeds = _counts(rng, r, len(shifts[a]))
            with np.errstate(invalid="ignore", divide="ignore"):
                out[start : start + r, a] = (weight @ per_example[a]) / weight.sum(1) + seeds @ shifts[a] / len(
                    shifts[a]
                )
    return out


def observed_means(matrices: list) -> np.ndarray:
    """[arms]: each arm's mean over its seeds and the examples all its seeds scored."""
    out = []
    for m in matrices:
        x = np.atleast_2d(np.asarray(m, np.float64))
        valid = ~np.isnan(x).any(axis=0)
        out.append(float(x[:, valid].mean()) if valid.any() else float("nan"))
    return np.array(out)


def interval(samples, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of resampled values (NaN resamples, e.g. a 0/0 ratio, left out)."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(s, alpha)), float(np.quantile(s, 1 - alpha))


def bootstrap_ci(scores, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of scores [seeds, examples]."""
    means = resample_means([scores], resamples, seed)[:, 0]
    return (float(observed_means([scores])[0]), *interval(means, level))


def relative_to_best(means, higher_is_better: bool = True, among=None) -> np.ndarray:
    """means [..., arms] relative to the best arm on the last axis (the best of `among`, a mask over
    arms, when given): mean / best, or best / mean when lower is better, so 1 is the best and less is
    worse either way (NaN where it divides by 0)."""
    m = np.asarray(means, np.float64)
    pool = m if among is None else m[..., np.asarray(among, bool)]
    if pool.shape[-1] == 0:  # no arm to be relative to
        return np.full_like(m, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        if higher_is_better:
            return m / np.max(pool, axis=-1, keepdims=True)
        return np.min(pool, axis=-1, keepdims=True) / m


def compare_with_best(observed, resampled, higher_is_better: bool = True) -> np.ndarray:
    """[arms] p-values of "arm i is worse than the best arm" (the best itself: 1); see the module doc."""
    sign = 1.0 if higher_is_better else -1.0
    g = sign * np.asarray(observed, np.float64)
    e = sign * np.asarray(resampled, np.float64) - g
    e = e[np.isfinite(e).all(axis=1)]
    gap = g.max() - g
    statistic = e.max(axis=1) - e.min(axis=1)  # the best re-picked in every resample, the largest gap to it
    p = (np.sum(statistic[:, None] >= gap[None] - 1e-12, axis=0) + 1) / (len(e) + 1)
    p[gap <= 0] = 1.0
    return p


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
