"""Feature density by rank and depth (the paper's claim that it rises with both), with a trend test.

Density here is the delta SAE's L0 (active latents per token) on the evaluation split; L0 / width is the
share of latents active per token. Every (adapter, layer) is measured on the same prompts, so one prompt
bootstrap over all cells at once gives paired intervals for the trends:
  rank_slope[L]  least-squares slope of L0 against log2(rank) at layer L (L0 per doubling of the rank)
  depth_slope[a] least-squares slope of L0 against the layer index for adapter a (L0 per layer)
each with `vs_null` against a slope of 0: +1 rises, -1 falls, 0 no trend distinguishable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lgeo_jax.stats import Interval, bootstrap, vs_null


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y [..., N] on x [N] along the last axis."""
    xc = x - x.mean()
    return np.sum((y - y.mean(axis=-1, keepdims=True)) * xc, axis=-1) / np.sum(xc**2)


def density_trends(adapters: Sequence[str], ranks: Sequence[int], layers: Sequence[int],
                   per_layer: Mapping[int, Mapping[str, np.ndarray]], *, n_boot: int, seed: int,
                   level: float) -> dict:
    """Trends of L0 with rank and depth from each layer's per-prompt sums (`analyze_layer`'s arrays
    `prompt_ids`, `prompt_tokens`, `<adapter>/prompt_l0`); `{}` when there is nothing to compare."""
    if len(adapters) < 2 and len(layers) < 2:
        return {}
    first = per_layer[layers[0]]
    for layer in layers:
        if not np.array_equal(per_layer[layer]["prompt_ids"], first["prompt_ids"]):
            raise ValueError(f"density trend: layer {layer} was measured on other prompts than layer {layers[0]}")
    l0 = np.stack([np.stack([per_layer[layer][f"{a}/prompt_l0"] for layer in layers], axis=-1)
                   for a in adapters], axis=1)  # [P, A, C]
    log_rank = np.log2(np.asarray(ranks, np.float64))
    depth = np.asarray(layers, np.float64)

    def statistic(t):
        grid = t["l0"] / t["tokens"][..., None, None]  # [..., A, C]
        parts = []
        if len(adapters) >= 2:
            parts.append(_slope(log_rank, np.swapaxes(grid, -1, -2)))  # [..., C]
        if len(layers) >= 2:
            parts.append(_slope(depth, grid))  # [..., A]
        return np.concatenate(parts, axis=-1)

    interval = bootstrap({"l0": l0, "tokens": first["prompt_tokens"]}, statistic, n_boot=n_boot, seed=seed,
                         level=level)
    zero = Interval.exact(0.0)

    def cell(i: int) -> dict:
        iv = interval[i]
        value = {"value": float(iv.point), "ci_low": float(iv.low), "ci_high": float(iv.high)}
        return {**value, "vs_null": vs_null(iv, zero)}

    out, i = {}, 0
    if len(adapters) >= 2:
        out["rank_slope"] = {f"L{layer}": cell(i + j) for j, layer in enumerate(layers)}
        i += len(layers)
    if len(layers) >= 2:
        out["depth_slope"] = {a: cell(i + j) for j, a in enumerate(adapters)}
    return out
