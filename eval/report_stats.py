"""The statistics of the report: one bootstrap for every interval, and the comparison with the best arm.

`resample_means(matrices)`: the arms of one dataset, each [seeds, examples] on one shared example
axis (NaN where an arm has no score for an example). Model: score[s, i] = arm + example_i + seed_s +
noise_si. Both sources of noise the study's runs cannot separate enter, which examples and which
seed. Each resample draws the examples with replacement once for all arms (so arms stay paired on
the same examples) and takes each arm's mean of its per-example means over seeds: that carries the
example and the noise terms. To it adds the arm's seed term, sigma* x z / sqrt(seeds), z standard
normal, independently per arm. sigma*^2 is drawn from the uncertainty of the seed variance, once
per resample for all arms: sigma*^2 = max(0, total x df / chi2_df - noise), the generalized pivotal
quantity of a variance component (`seed_variance`: total, the unbiased variance of one seed's mean
pooled over the arms, df = sum of (seeds - 1); noise, the part of it the examples already carry).
Why: with two seeds an arm's own seed variance has 1 degree of freedom — resampling its two seed
deviations estimated it with a (seeds - 1) / seeds factor, half, and with no allowance for how
little two seeds say, so intervals covered 74% and equal arms were flagged up to 31% of studies
(n = 2000, seed sd 0.03). Pooling assumes one seed variance for the arms of a dataset; with df
degrees of freedom the seed term is a t-style inflation (multivariate t with df, as in Dunnett's
comparisons), exact where seed noise dominates. With one seed per arm (df = 0) the seed noise cannot
be estimated and is not counted: intervals then cover only the examples' noise. Every interval of
the report (an arm on a dataset, the averages over datasets, the relative scores) is a percentile
interval of these resamples, or of functions of them.

Simulated (tests/eval/test_report_grid.py; 8 equal arms, 2 seeds, binary scores on shared Beta(2, 2)
difficulties, a normal seed shift, 1000 studies, 400 resamples): familywise error (any arm flagged)
5.4% at n = 270 examples and seed sd 0.03, 5.7% at n = 1000 and sd 0.02, 6.0% at n = 1000 and sd
0.03 (300 studies: 4.7% at n = 2000 and sd 0.03), each within about 1.5 Monte-Carlo errors (0.7%)
of 5%; where example noise dominates (sd 0) it is conservative: 1.0%. Per-arm 95% intervals covered
the true mean in 94.1-95.6% of cases. Pure normal seed noise: 5.4% (2000 studies).

`bootstrap_ci(scores)`: (mean, low, high) of one arm's [seeds, examples] from the same resampling.
Alone, an arm's seed variance has seeds - 1 degrees of freedom: with two seeds the interval is as
wide as a t with 1 degree of freedom makes it (simulated coverage 95.7% at n = 2000, seed sd 0.03,
where resampling the seed deviations covered 74%); the report's intervals pool the dataset's arms.

`compare_with_best(observed, resampled)`: which arms are worse than the best one, when the best
was picked after seeing the data. Gap of arm i: best mean - mean_i (higher is better; mirrored for
lower-is-better metrics). Null: all arms equal. In each resample the means are centred on the
observed ones (e*_j = m*_j - m_j, which imposes the null), the best is re-picked among them, and the
statistic is the largest gap to it over all arms, max_j e*_j - min_i e*_i. p_i = (resamples whose
statistic >= gap_i, + 1) / (resamples + 1): a single-step max-T bootstrap comparison with the best,
so picking the best and testing about eight arms together keep the familywise error at about alpha
(the simulation above; the arms' seed terms share one sigma*, as the multivariate t does).

One pair of arms on the same examples (a per-example sign-flip test) is
`scipy.stats.permutation_test((a, b), mean difference, permutation_type="samples")`. The report does
not use it: against a best arm picked from the same data it flags far more than alpha of equal arms
(tests/eval/test_report_grid.py simulates it), so the report uses `compare_with_best` instead.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
_CELLS_PER_CHUNK = 4_000_000  # resamples x examples held at once


def _counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """[resamples, n]: how often each of n items is drawn in n draws with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + np.arange(resamples)[:, None] * n
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def seed_variance(xs: list, valid: list, seeded) -> tuple[float, float, int]:
    """(total, noise, df) of the seed term, pooled over the seeded arms with two or more seeds:
    total = sum over arms and seeds of (seed's mean - arm's mean)^2 / df, df = sum of (seeds - 1)
    (an unbiased estimate of the variance of one seed's mean, sigma_seed^2 + sigma_e^2 / n); noise =
    the example part of it, sigma_e^2 times the mean of 1 / n, sigma_e^2 estimated from the seed x
    example residuals (x - seed's mean - example's mean + mean; (seeds - 1)(examples - 1) degrees of
    freedom). df = 0: no arm has two seeds, the seed noise cannot be estimated."""
    ss_seed = ss_noise = inv_n = 0.0
    df = df_noise = 0
    for x, v, s in zip(xs, valid, seeded):
        x = x[:, v]
        seeds, n = x.shape
        if not s or seeds < 2 or n == 0:
            continue
        seed_means = x.mean(axis=1)
        ss_seed += float(np.sum((seed_means - seed_means.mean()) ** 2))
        df += seeds - 1
        inv_n += (seeds - 1) / n
        if n > 1:
            residual = x - seed_means[:, None] - x.mean(axis=0)[None] + x.mean()
            ss_noise += float(np.sum(residual**2))
            df_noise += (seeds - 1) * (n - 1)
    if df == 0:
        return 0.0, 0.0, 0
    noise = ss_noise / df_noise * inv_n / df if df_noise else 0.0
    return ss_seed / df, noise, df


def resample_means(matrices: list, resamples: int = RESAMPLES, seed: int = 0, seeded=None) -> np.ndarray:
    """[resamples, arms]: each arm's mean in each resample (see the module doc). matrices[a]:
    [seeds_a, examples] (one example axis for all arms, NaN = no score), or [examples] for one seed.
    seeded: a mask over arms, those with a training seed (default all); the others (a base model's
    evaluation) get no seed term and add nothing to its estimate."""
    xs = [np.atleast_2d(np.asarray(m, np.float64)) for m in matrices]
    n = xs[0].shape[1]
    if any(x.shape[1] != n for x in xs):
        raise ValueError(f"arms have different example axes: {[x.shape for x in xs]}")
    seeded = np.ones(len(xs), bool) if seeded is None else np.asarray(seeded, bool)
    valid = [~np.isnan(x).any(axis=0) for x in xs]  # an arm's examples: those all its seeds scored
    per_example = [np.where(v, x, 0.0).mean(axis=0) for x, v in zip(xs, valid)]
    total, noise, df = seed_variance(xs, valid, seeded)
    seed_scale = np.array([1.0 / x.shape[0] if s else 0.0 for x, s in zip(xs, seeded)])  # Var(seed term) / sigma^2
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(xs)))
    chunk = max(1, _CELLS_PER_CHUNK // max(n, 1))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        examples = _counts(rng, r, n)  # shared by the arms: they stay paired
        for a in range(len(xs)):
            weight = examples * valid[a]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[start : start + r, a] = (weight @ per_example[a]) / weight.sum(1)
        if df:  # the seed variance drawn from its own uncertainty, one draw for all arms of a resample
            sigma2 = np.maximum(total * df / rng.chisquare(df, size=r) - noise, 0.0)
            out[start : start + r] += np.sqrt(sigma2[:, None] * seed_scale[None]) * rng.standard_normal((r, len(xs)))
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
    arms, when given); 1 is the best and less is worse either way, defined and monotone everywhere:
    - higher is better: mean / best (0.98 = 2% below the best); where the best is <= 0, where a
      ratio means nothing, 1 - (best - mean);
    - lower is better: 1 - (mean - best), one minus the excess over the best in the metric's own
      units (0.98 = 0.02 above the best: 2 points of a rate). Not best / mean: a rate or a KL of 0
      is a likely best, and 0 / mean is 0 for every other arm and NaN for the best.
    NaN only where a mean is NaN."""
    m = np.asarray(means, np.float64)
    pool = m if among is None else m[..., np.asarray(among, bool)]
    if pool.shape[-1] == 0:  # no arm to be relative to
        return np.full_like(m, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        if not higher_is_better:
            return 1.0 - (m - np.min(pool, axis=-1, keepdims=True))
        best = np.max(pool, axis=-1, keepdims=True)
        return np.where(best > 0, m / np.where(best > 0, best, 1.0), 1.0 - (best - m))


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
