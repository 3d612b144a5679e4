"""Monte Carlo nulls for Tables 9 and 10 (docs/conventions.md, "Statistics"): what the statistics give with
no structure, each over `null_samples` (>= 20) independent draws, reported as the mean and the central
interval of the draws (`lgeo_jax.stats.null_interval`).

* Random directions: m Gaussian rows against n Gaussian rows in R^d, summarised by `compare` exactly like
  the estimate, beside the exact expected max-cosine and mutual-nearest fraction n / (n + m - 1).
* Random subspaces: pairs of random k-dim subspaces (Monte Carlo), beside Wachter's large-d limit when
  2k <= d (its mean angle and near-orthogonal / aligned fractions).
* Random-init SAE: the decoder our SAE training starts from (`lgeo_jax.sae.init_params`), m of its rows
  against the *real* dictionary: unlike two random sets it keeps the dictionary's own anisotropy, so it is
  the null the verdicts of Tables 9-10 use.
The nulls depend only on shapes, seeds and the dictionary, so the stage caches them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._dictionary import angle_stats, compare
from lgeo_jax.geometry import (
    expected_max_cosine,
    expected_mutual_nearest_fraction,
    null_principal_angles,
    wachter_angle_stats,
)
from lgeo_jax.sae import SAEConfig, init_params


@dataclasses.dataclass(frozen=True)
class RowNull:
    """A Table 9 null: `ROW_STATS` of every draw [R, 6] and the per-row values [M, 3] of draw 0 (for plots)."""

    stats: np.ndarray
    first_rows: np.ndarray


_NULL_STREAM = 0x6E756C6C  # folded into the key: SAE training seeds use jax.random.key(seed) itself


def random_init_decoder(width: int, d: int, *, seed: int, draw: int = 0) -> Float[np.ndarray, "F D"]:
    """Decoder rows [width, d] of a freshly initialised SAE (unit-norm Gaussian rows, our training's start).

    The key is `fold_in(fold_in(key(seed), tag), draw)`, never `key(seed)`: training inits SAEs from
    `key(seed)`, and a null that shared a trained SAE's own starting point would not be independent of it.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NULL_STREAM), draw)
    return np.asarray(init_params(key, SAEConfig(d_in=d, d_sae=width))["W_dec"])


def _gaussian_rows(n: int, d: int, seed: int, draw: int, side: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), draw), side)
    return np.asarray(jax.random.normal(key, (n, d), jax.numpy.float32))


def _first_rows(w: np.ndarray, m: int) -> np.ndarray:
    """`w` [F, D] with every row after the first m zeroed: m live rows at a shape fixed per width (i.i.d. rows,
    so which m are kept does not matter), hence one compilation per width rather than per live count."""
    out = np.array(w, np.float32)
    out[m:] = 0.0
    return out


class NullCache:
    """The Monte Carlo nulls of one stage, computed once per shape (and dictionary)."""

    def __init__(self, n_draws: int, seed: int, *, near_orthogonal: float, aligned: float, chunk: int = 512):
        self.n_draws, self.seed, self.chunk = n_draws, seed, chunk
        self.near_orthogonal, self.aligned = near_orthogonal, aligned
        self._directions: dict[tuple, RowNull] = {}
        self._subspaces: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._init: dict[tuple, tuple[RowNull, dict[int, np.ndarray], dict[int, np.ndarray]]] = {}

    def random_directions(self, m: int, width: int, n: int, d: int) -> RowNull:
        """m (of `width`) random directions against n random directions: `ROW_STATS` per draw and draw 0's
        per-row values."""
        if (m, width, n, d) not in self._directions:
            draws = [compare(_first_rows(_gaussian_rows(width, d, self.seed, r, 0), m),
                             _gaussian_rows(n, d, self.seed, r, 1), (), chunk=self.chunk) for r in range(self.n_draws)]
            self._directions[(m, width, n, d)] = RowNull(np.stack([c.row_summary() for c in draws]), draws[0].rows)
        return self._directions[(m, width, n, d)]

    def random_subspaces(self, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of random k-dim subspaces of R^d: `ANGLE_STATS` [R, 4] and the angles [R, k] themselves."""
        if (k, d) not in self._subspaces:
            # one trial per call: batched decompositions can deadlock jaxlib's CPU pool (`subspace_resamples`)
            angles = np.concatenate([np.asarray(null_principal_angles(k, d, seed=self.seed + r, n_trials=1))
                                     for r in range(self.n_draws)])  # [R, k]
            self._subspaces[(k, d)] = (angle_stats(angles, self.near_orthogonal, self.aligned), angles)
        return self._subspaces[(k, d)]

    def random_init(self, key: str, width: int, m: int, dictionary_rows: np.ndarray, dictionary_basis: np.ndarray,
                    ks: Sequence[int]) -> tuple[RowNull, dict[int, np.ndarray], dict[int, np.ndarray]]:
        """m rows of random-init decoders of `width` against the dictionary (`key` names it, e.g. its layer):
        `ROW_STATS` per draw (with draw 0's rows), `{k: ANGLE_STATS [R, 4]}` and `{k: angles [R, k]}`."""
        cache_key = (key, width, m, tuple(ks))
        if cache_key not in self._init:
            d = dictionary_rows.shape[1]
            draws = [compare(_first_rows(random_init_decoder(width, d, seed=self.seed, draw=r), m),
                             dictionary_rows, ks, chunk=self.chunk, b_basis=dictionary_basis)
                     for r in range(self.n_draws)]
            stats = {k: np.stack([c.angle_summary(self.near_orthogonal, self.aligned)[k] for c in draws]) for k in ks}
            angles = {k: np.stack([c.angles[k] for c in draws]) for k in ks}
            self._init[cache_key] = (RowNull(np.stack([c.row_summary() for c in draws]), draws[0].rows), stats, angles)
        return self._init[cache_key]


def expected_random_directions(m: int, n: int, d: int) -> dict[str, float]:
    """Exact expectations for m random directions against n: mean max-cosine (signed, |cos|), mutual-nearest
    fraction."""
    return {"mean": expected_max_cosine(n, d), "abs_mean": expected_max_cosine(n, d, absolute=True),
            "mnn": expected_mutual_nearest_fraction(m, n)}


@functools.lru_cache(maxsize=64)  # a numerical integral (~2 s): once per shape, not per adapter
def subspace_limit(k: int, d: int, near_orthogonal: float, aligned: float) -> dict[str, float] | None:
    """Wachter's large-d law for two random k-dim subspaces of R^d (None unless 2k <= d)."""
    if 2 * k > d:
        return None
    w = wachter_angle_stats(k, k, d, near_orthogonal=near_orthogonal, aligned=aligned)
    return {"mean": w["mean"], "min": w["min"], "pct_near_orthogonal": 100.0 * w["frac_near_orthogonal"],
            "pct_aligned": 100.0 * w["frac_aligned"]}
