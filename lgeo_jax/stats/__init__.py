"""Uncertainty for the report's numbers (docs/conventions.md, "Statistics"): host-side numpy float64, no JAX.

* `PromptSums`: per-prompt sums of named per-token quantities, streamed batch by batch, mergeable.
* `bootstrap`: prompt (cluster) bootstrap of a statistic of totals -> percentile `Interval`.
* `bootstrap_items`: the same over i.i.d. items (latents, seeds), for any reducing statistic.
* `bootstrap_groups`: a mean over groups (SAE seeds), resampling groups and then items within them.
* `resample_counts`, `interval_from_samples`: the shared resampling scheme and percentile rule, for statistics
  computed outside this package (on a device) that must stay paired with the others; `basic=True` and
  `bias_corrected` for a statistic biased in small samples (linear CKA), whose percentile interval misses.
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
from lgeo_jax.stats._bootstrap import (
    bias_corrected,
    bootstrap,
    bootstrap_groups,
    bootstrap_items,
    interval_from_samples,
    resample_counts,
)
from lgeo_jax.stats._interval import Interval, Method
from lgeo_jax.stats._verdict import MIN_NULL_DRAWS, null_interval, vs_null

__all__ = ["COUNT", "MIN_NULL_DRAWS", "Interval", "Method", "PromptSums", "bias_corrected", "bootstrap",
           "bootstrap_groups",
           "bootstrap_items", "interval_from_samples", "null_interval", "resample_counts", "vs_null"]
