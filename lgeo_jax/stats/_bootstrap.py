"""Percentile bootstrap over prompts (clusters of tokens) and over i.i.d. items (latents, seeds).

Resampling scheme (both functions; a loop written from this paragraph reproduces them exactly):
`rng = np.random.default_rng(seed)`; resample b = 0, 1, ..., n_boot - 1 draws `rng.integers(0, n, size=n)`,
n units with replacement. The statistic of every resample is computed, and the interval is the
`50 - 50 level` and `50 + 50 level` percentiles of those values (`np.percentile`, linear interpolation;
written so, level 0.95 gives exactly the 2.5 and 97.5 percentiles).
Draws are made chunk by chunk to bound memory, which does not change them: numpy's Generator yields the
same integers whether asked for [b1 + b2, n] at once or [b1, n] then [b2, n]. The same seed and unit
count give the same resamples, so intervals of several statistics on the same prompts are paired;
still, compute a comparison (a difference, a ratio) inside one statistic to get its own interval.

Prompt bootstrap: a statistic of *totals* over prompts (mean = sum_x / n, pooled ratio
sqrt(sum err^2 / sum ||x||^2), mean of per-token ratios = sum ratio / sum n_ratio, CKA from moment sums)
only needs each resample's totals, which are counts @ per_prompt_sums with counts [b, P] the times
each prompt was drawn (a bincount of the draws: exact multinomial resampling, no Poisson shortcut).
One matrix product per chunk serves every quantity at once.

A statistic undefined on some resample (e.g. a zero denominator when no drawn prompt has an active
token) gives NaN bounds for that element: its interval is not known, and none is invented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from lgeo_jax.stats._interval import Interval, Method

CHUNK_BYTES = 64 * 2**20  # default working memory for one chunk of resamples


def _check_args(n_units: int, n_boot: int, level: float, where: str) -> None:
    if n_units < 2:
        raise ValueError(f"{where}: need at least 2 units to resample, got {n_units}")
    if n_boot < 2:
        raise ValueError(f"{where}: n_boot must be >= 2, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"{where}: level must lie in (0, 1), got {level}")


def _chunk_sizes(n_boot: int, bytes_per_resample: int, chunk_bytes: int) -> list[int]:
    per_chunk = max(1, min(n_boot, chunk_bytes // max(bytes_per_resample, 1)))
    return [min(per_chunk, n_boot - start) for start in range(0, n_boot, per_chunk)]


def resample_counts(n_units: int, n_boot: int, *, seed: int = 0, bytes_per_resample: int = 0,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The resampling scheme of this module, chunk by chunk: count matrices [b, n_units] (int64) whose row r says
    how often resample r drew each unit; the chunks' b sum to `n_boot`.

    `bootstrap`, `bootstrap_items` and any statistic computed elsewhere from these counts (the analysis'
    prompt-bootstrap CKA, the latent bootstrap of a subspace) draw the same resamples for the same
    (seed, n_units), so their intervals are paired. `bytes_per_resample` sizes the chunks.
    """
    rng = np.random.default_rng(seed)
    for b in _chunk_sizes(n_boot, bytes_per_resample + 16 * n_units, chunk_bytes):
        draws = rng.integers(0, n_units, size=(b, n_units))  # [b, n]
        offsets = np.arange(b, dtype=np.int64)[:, None] * n_units  # [b, 1]: resample r counts in row r
        yield np.bincount((draws + offsets).ravel(), minlength=b * n_units).reshape(b, n_units)  # [b, n]


def interval_from_samples(point: np.ndarray, samples: np.ndarray, *, level: float, method: Method, n_units: int,
                          keep_samples: bool = False, basic: bool = False) -> Interval:
    """Percentile interval of bootstrap statistics `samples` [n_boot, *S] around `point` [*S] (the module's rule:
    `50 -/+ 50 level` percentiles); NaN bounds where any resample was not finite.

    `basic=True` gives the basic (reverse-percentile) interval [2 point - q_high, 2 point - q_low] instead, for a
    statistic whose resamples are shifted from its point by a bias of the estimator itself (linear CKA: with
    prompts drawn more than once a resample has fewer distinct tokens, and CKA is biased upward in small
    samples). It corrects that bias to first order; the percentile interval inherits it twice. Its centre is
    the bias-corrected value 2 point - mean(samples) (`bias_corrected`).
    """
    point, samples = np.asarray(point, np.float64), np.asarray(samples, np.float64)
    interval = _percentile_interval(point, samples, level, method, n_units, keep_samples)
    if not basic:
        return interval
    return dataclasses.replace(interval, low=2 * point - interval.high, high=2 * point - interval.low)


def bias_corrected(point: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """2 point - mean(samples): the point value less the bootstrap estimate of its bias (NaN where undefined)."""
    samples = np.asarray(samples, np.float64)
    with np.errstate(invalid="ignore"):
        return 2 * np.asarray(point, np.float64) - samples.mean(axis=0)


def _percentile_interval(point: np.ndarray, samples: np.ndarray, level: float, method: Method, n_units: int,
                         keep_samples: bool) -> Interval:
    """Percentile interval of `samples` [n_boot, *S]; NaN bounds where any resample was not finite."""
    low, high = np.percentile(samples, [50.0 - 50.0 * level, 50.0 + 50.0 * level], axis=0)  # [*S] each
    undefined = ~np.all(np.isfinite(samples), axis=0)  # [*S]
    low, high = np.where(undefined, np.nan, low), np.where(undefined, np.nan, high)
    return Interval(point=point, low=low, high=high, level=level, method=method, n_draws=samples.shape[0],
                    n_units=n_units, samples=samples if keep_samples else None)


def _checked(value: object, expected: tuple[int, ...], what: str, hint: str) -> np.ndarray:
    out = np.asarray(value, np.float64)
    if out.shape != expected:
        raise ValueError(f"{what} returned shape {out.shape}, expected {expected}; {hint}")
    return out


def bootstrap(per_prompt: Mapping[str, np.ndarray], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray], *,
              n_boot: int = 1000, seed: int = 0, level: float = 0.95, vectorized: bool = True,
              keep_samples: bool = False, chunk_bytes: int = CHUNK_BYTES) -> Interval:
    """Prompt (cluster) bootstrap of a statistic of totals: point = statistic(totals over all prompts).

    per_prompt: name -> [P, *shape_name] per-prompt sums (e.g. `PromptSums.sums`), one row per prompt.
    statistic: maps totals (name -> array) to the statistic [*S]. With `vectorized` (the fast default) it
      is called on chunks of resamples, name -> [b, *shape_name], and must return [b, *S]: write it to
      broadcast over a leading axis (`t["a"] / t["b"]`, `np.einsum("...pq,...pq->...", ...)`); a statistic
      that reduces over that axis is caught by its output shape. With `vectorized=False` it is called once
      per resample on name -> [*shape_name].
    Raw moment sums for CKA lose precision when the mean dwarfs the spread: shift the data by a fixed
    reference (e.g. a corpus mean) before summing the moments per prompt.
    """
    arrays = {name: np.asarray(value, np.float64) for name, value in per_prompt.items()}
    if not arrays:
        raise ValueError("bootstrap: per_prompt is empty")
    given = {name: value.shape for name, value in arrays.items()}
    if any(len(shape) == 0 for shape in given.values()) or len({shape[0] for shape in given.values()}) != 1:
        raise ValueError(f"bootstrap: per-prompt arrays must share a leading prompt axis, got shapes {given}")
    p = next(iter(arrays.values())).shape[0]
    _check_args(p, n_boot, level, "bootstrap")
    names = list(arrays)
    shapes = [arrays[name].shape[1:] for name in names]
    flat = np.concatenate([arrays[name].reshape(p, -1) for name in names], axis=1)  # [P, K]
    splits = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]

    def unflatten(totals: np.ndarray) -> dict[str, np.ndarray]:  # [..., K] -> name -> [..., *shape]
        parts = np.split(totals, splits, axis=-1)
        return {name: part.reshape((*totals.shape[:-1], *shape))
                for name, part, shape in zip(names, parts, shapes, strict=True)}

    point = np.asarray(statistic(unflatten(flat.sum(axis=0))), np.float64)  # [*S]
    chunks = []
    for counts in resample_counts(p, n_boot, seed=seed, bytes_per_resample=8 * (flat.shape[1] + point.size),
                                  chunk_bytes=chunk_bytes):
        b = counts.shape[0]
        totals = counts.astype(np.float64) @ flat  # [b, K]
        if vectorized:
            chunks.append(_checked(statistic(unflatten(totals)), (b, *point.shape), "bootstrap: statistic",
                                   "a vectorized statistic must keep the leading resample axis (or pass "
                                   "vectorized=False)"))
        else:
            chunks.append(np.stack([_checked(statistic(unflatten(row)), point.shape, "bootstrap: statistic",
                                             "it must return the shape it gave on the full data")
                                    for row in totals]))
    return _percentile_interval(point, np.concatenate(chunks), level, Method.PROMPT_BOOTSTRAP, p, keep_samples)


def bootstrap_items(values: np.ndarray, statistic: Callable[..., np.ndarray] = np.mean, *, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95, keep_samples: bool = False,
                    chunk_bytes: int = CHUNK_BYTES) -> Interval:
    """Bootstrap over i.i.d. items, the rows of `values` [N, ...] (per-latent max-cosines, per-seed values).

    `statistic(x, axis=...)` reduces the item axis, like `np.mean` or `np.median`, e.g.
    `lambda x, axis: np.mean(x < 0.3, axis=axis)` for a fraction. It is called as `statistic(values, axis=0)`
    for the point value [*S] and as `statistic(resampled, axis=1)` on chunks [b, N, ...] -> [b, *S].
    """
    values = np.asarray(values, np.float64)
    if values.ndim == 0:
        raise ValueError("bootstrap_items: values must have a leading item axis")
    n = values.shape[0]
    _check_args(n, n_boot, level, "bootstrap_items")
    point = np.asarray(statistic(values, axis=0), np.float64)  # [*S]
    rng = np.random.default_rng(seed)
    chunks = []
    for b in _chunk_sizes(n_boot, 8 * (n + values.size), chunk_bytes):
        resampled = values[rng.integers(0, n, size=(b, n))]  # [b, N, ...]
        chunks.append(_checked(statistic(resampled, axis=1), (b, *point.shape), "bootstrap_items: statistic",
                               "it must reduce exactly the item axis it is given"))
    return _percentile_interval(point, np.concatenate(chunks), level, Method.ITEM_BOOTSTRAP, n, keep_samples)


def bootstrap_groups(points: np.ndarray, samples: np.ndarray, *, seed: int = 0, level: float = 0.95,
                     keep_samples: bool = False) -> Interval:
    """Two-stage bootstrap of a mean over groups (SAE seeds, seed pairs), each with its own item bootstrap.

    points: [G, *S] the statistic of each group on its full data; samples: [G, B, *S] each group's item-
    bootstrap replicates (e.g. `bootstrap_items(..., keep_samples=True).samples`, all with B resamples).
    The estimate is the mean over groups. Resample r draws G groups with replacement and, for each drawn
    group, one of its replicates uniformly (an independent resample of its items); the replicate value is
    their mean. So the interval carries both the between-group spread and each group's item noise. With one
    group it is that group's own percentile interval of its replicates (method ITEM_BOOTSTRAP).
    """
    points, samples = np.asarray(points, np.float64), np.asarray(samples, np.float64)
    if points.ndim == 0 or samples.shape[:1] != points.shape[:1] or samples.shape[2:] != points.shape[1:]:
        raise ValueError(f"bootstrap_groups: points {points.shape} must be [G, *S] and samples {samples.shape} "
                         "[G, B, *S]")
    g, n_boot = samples.shape[:2]
    if g == 1:
        return _percentile_interval(points[0], samples[0], level, Method.ITEM_BOOTSTRAP, 1, keep_samples)
    _check_args(g, n_boot, level, "bootstrap_groups")
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, g, size=(n_boot, g))  # [B, G] drawn groups
    replicates = rng.integers(0, n_boot, size=(n_boot, g))  # [B, G] one replicate of each drawn group
    values = samples[groups, replicates].mean(axis=1)  # [B, *S]
    return _percentile_interval(points.mean(axis=0), values, level, Method.GROUP_BOOTSTRAP, g, keep_samples)
