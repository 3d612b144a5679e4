"""Monte Carlo null intervals and the verdict of an estimate against a null (docs/conventions.md, "Statistics").

A null draw is the statistic computed once, exactly as for the estimate, on one random instance (random
directions, random subspaces, a shuffled pairing, a random-init SAE). Its interval is the central
`level` range of the draws; a handful of draws would make those percentiles the sample extremes, so
at least `MIN_NULL_DRAWS` are required.

Verdict rule, elementwise:
    +1  the estimate's interval lies entirely above the null's:  estimate.low  > null.high
    -1  it lies entirely below:                                  estimate.high < null.low
     0  otherwise: the intervals overlap or touch, or a bound is undefined (NaN): indistinguishable.
This is deliberately conservative: two non-overlapping 95% intervals mean a difference well beyond a 5%
test, so a 0 is "no finding", not "equal to the null".
"""

from __future__ import annotations

import numpy as np

from lgeo_jax.stats._interval import Interval, Method

MIN_NULL_DRAWS = 20


def null_interval(draws: np.ndarray, *, level: float = 0.95, keep_samples: bool = False) -> Interval:
    """Monte Carlo null from `draws` [R, ...]: point = mean, [low, high] = the central `level` percentiles.

    For level 0.95 the bounds are `np.percentile(draws, [2.5, 97.5], axis=0)` (linear interpolation).
    """
    draws = np.asarray(draws, np.float64)
    if draws.ndim == 0 or draws.shape[0] < MIN_NULL_DRAWS:
        raise ValueError(f"null_interval: need >= {MIN_NULL_DRAWS} null draws along axis 0, got shape "
                         f"{draws.shape}")
    if not np.all(np.isfinite(draws)):
        raise ValueError(f"null_interval: {int(np.sum(~np.isfinite(draws)))} null draws are not finite; a null "
                         "computed the same way as the estimate should always be defined")
    if not 0.0 < level < 1.0:
        raise ValueError(f"null_interval: level must lie in (0, 1), got {level}")
    # 50 - 50 level, not 50 (1 - level): the latter is 2.500000000000002 for level 0.95
    low, high = np.percentile(draws, [50.0 - 50.0 * level, 50.0 + 50.0 * level], axis=0)  # [...] each
    return Interval(point=draws.mean(axis=0), low=low, high=high, level=level, method=Method.MONTE_CARLO,
                    n_draws=draws.shape[0], n_units=draws.shape[0], samples=draws if keep_samples else None)


def vs_null(estimate: Interval, null: Interval) -> int | np.ndarray:
    """+1 / -1 / 0: estimate entirely above / entirely below / not separable from the null (module docstring).

    An int for scalar intervals; an int8 array of the broadcast shape for array statistics.
    """
    above = estimate.low > null.high  # NaN compares False: an undefined bound never makes a finding
    below = estimate.high < null.low
    verdict = np.where(above, 1, np.where(below, -1, 0)).astype(np.int8)
    return int(verdict) if verdict.ndim == 0 else verdict
