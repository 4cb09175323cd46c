"""The paired test on two arms' per-example scores: scipy's sign-flip permutation test (the report uses
eval.report_stats.compare_with_best instead; tests show why)."""

import numpy as np
from scipy import stats


def paired_p(a, b, n_resamples=np.inf, seed: int = 0) -> float:
    """Two-sided p of mean(a - b) under sign flips of the pairs (exact with n_resamples=np.inf)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return stats.permutation_test(
        (a, b),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=n_resamples,
        vectorized=True,
        alternative="two-sided",
        random_state=seed,
    ).pvalue
