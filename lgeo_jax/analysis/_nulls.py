"""Random baselines for Tables 9 and 10 (docs/conventions.md, "Statistics"): what the statistics give with no structure.

* Random directions: `m` Gaussian rows against `n` Gaussian rows in R^d (Monte Carlo, the real kernels)
  next to the exact expected max-cosine of a fixed direction against `n` random ones.
* Random subspaces: `n_trials` pairs of random k-dim subspaces (Monte Carlo) next to Wachter's
  large-d limit when 2k <= d (its mean angle and near-orthogonal / aligned fractions).
* Random-init SAE: the decoder our SAE training starts from (`lgeo_jax.sae.init_params`), which the
  stage compares with the *real* dictionary: unlike two random sets, it keeps the dictionary's own
  anisotropy, so it is the right floor for "delta SAE vs Gemma Scope".
The nulls depend only on shapes and seeds, so the stage caches them per shape.
"""

from __future__ import annotations

import jax
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._dictionary import angle_stats, max_cosine_stats
from lgeo_jax.geometry import (
    expected_max_cosine,
    null_max_cosine,
    null_principal_angles,
    wachter_angle_stats,
)
from lgeo_jax.sae import SAEConfig, init_params


def random_max_cosine(m: int, n: int, d: int, *, seed: int, chunk: int = 512) -> dict[str, np.ndarray]:
    """Monte Carlo max-cosines [m] of m random directions against n random directions (signed, |cos|)."""
    signed = np.asarray(null_max_cosine(m, n, d, seed=seed, chunk=chunk))
    absolute = np.asarray(null_max_cosine(m, n, d, seed=seed, chunk=chunk, absolute=True))
    return {"max_cos": signed, "max_cos_abs": absolute}


def random_max_cosine_summary(draw: dict[str, np.ndarray], n: int, d: int) -> dict:
    """Monte Carlo stats of a `random_max_cosine` draw plus the exact expected max-cosine (mean only)."""
    return {
        "max_cosine": {**max_cosine_stats(draw["max_cos"]), "expected": expected_max_cosine(n, d)},
        "max_cosine_abs": {**max_cosine_stats(draw["max_cos_abs"]),
                           "expected": expected_max_cosine(n, d, absolute=True)},
    }


def random_angles(k: int, d: int, *, n_trials: int, seed: int) -> Float[np.ndarray, "R K"]:
    """Principal angles [n_trials, k] (degrees) between pairs of random k-dim subspaces of R^d."""
    return np.asarray(jax.block_until_ready(null_principal_angles(k, d, seed=seed, n_trials=n_trials)))


def random_angles_summary(angles: np.ndarray, d: int, near_orthogonal: float, aligned: float) -> dict:
    """Monte Carlo angle stats, with Wachter's large-d limit as `limit` when it applies (2k <= d)."""
    k = angles.shape[-1]
    out = angle_stats(angles, near_orthogonal, aligned)
    if 2 * k <= d:
        w = wachter_angle_stats(k, k, d, near_orthogonal=near_orthogonal, aligned=aligned)
        out["limit"] = {"mean": w["mean"], "min": w["min"], "pct_near_orthogonal": 100.0 * w["frac_near_orthogonal"],
                        "pct_aligned": 100.0 * w["frac_aligned"]}
    return out


_NULL_STREAM = 0x6E756C6C  # folded into the key: SAE training seeds use jax.random.key(seed) itself


def random_init_decoder(width: int, d: int, *, seed: int) -> Float[np.ndarray, "F D"]:
    """Decoder rows [width, d] of a freshly initialised SAE (unit-norm Gaussian rows, our training's start).

    The key is `fold_in(key(seed), tag)`, never `key(seed)`: training inits SAEs from `key(seed)`, and a
    null that shared a trained SAE's own starting point would not be independent of it.
    """
    key = jax.random.fold_in(jax.random.key(seed), _NULL_STREAM)
    params = init_params(key, SAEConfig(d_in=d, d_sae=width))
    return np.asarray(params["W_dec"])
