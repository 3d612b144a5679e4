"""Uncertainty for the report's numbers (docs/conventions.md, "Statistics"): host-side numpy float64, no JAX.

* `PromptSums`: per-prompt sums of named per-token quantities, streamed batch by batch, mergeable.
* `bootstrap`: prompt (cluster) bootstrap of a statistic of totals -> percentile `Interval`.
* `bootstrap_items`: the same over i.i.d. items (latents, seeds), for any reducing statistic.
* `null_interval`: Monte Carlo null draws -> mean and central percentiles.
* `vs_null`: +1 / -1 / 0, the estimate's interval entirely above / below / not separable from the null's.

Typical use::

    acc = PromptSums()
    for rows in batches:  # err_sq, norm_sq: [B]; rows.sample_index: [B]
        acc.add(rows.sample_index, {"err_sq": err_sq, "norm_sq": norm_sq})
    pooled = bootstrap(acc.sums, lambda t: np.sqrt(t["err_sq"] / t["norm_sq"]), n_boot=1000, seed=0)
    verdict = vs_null(pooled, null_interval(null_draws))
"""

from lgeo_jax.stats._accumulate import COUNT, PromptSums
from lgeo_jax.stats._bootstrap import bootstrap, bootstrap_items
from lgeo_jax.stats._interval import Interval, Method
from lgeo_jax.stats._verdict import MIN_NULL_DRAWS, null_interval, vs_null

__all__ = ["COUNT", "MIN_NULL_DRAWS", "Interval", "Method", "PromptSums", "bootstrap", "bootstrap_items",
           "null_interval", "vs_null"]
