"""Monte Carlo nulls for Tables 9 and 10 (docs/conventions.md, "Statistics"): what the statistics give with
no structure, each over `null_samples` (>= 20) independent draws, reported as the mean and the central
interval of the draws (`lgeo_jax.stats.null_interval`).

* Random directions: m Gaussian rows against n Gaussian rows in R^d, summarised by `compare` exactly like
  the estimate, beside the exact expected max-cosine and mutual-nearest fraction n / (n + m - 1).
* Random subspaces: pairs of random k-dim subspaces (Monte Carlo), beside Wachter's large-d limit when
  2k <= d (its mean angle and near-orthogonal / aligned fractions).
* Random-init SAE: the decoder our SAE training starts from (`lgeo_jax.sae.init_params`), m of its rows
  against the *real* dictionary: unlike two random sets it keeps the dictionary's own anisotropy, so it is
  the null the verdicts of Tables 9-10 use. Table 9's one-to-one matching (mean Hungarian-matched cosine)
  has both nulls too: random directions (`null_matching`) and the same random-init decoders.
* LoRA-span linkage (`lgeo_jax.analysis._lora_span`): random subspaces of the span's dimension (bases, and
  principal angles against a k-dim subspace), and the spectrum of a structureless signal filling such a
  subspace (Wishart draws) for the effective rank.
The nulls depend only on shapes, seeds and the dictionary, so the stage caches them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._dictionary import angle_stats, compare, matched_cosine
from lgeo_jax.geometry import (
    expected_max_cosine,
    expected_mutual_nearest_fraction,
    null_matching,
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


def random_init_params(cfg: SAEConfig, *, seed: int, draw: int = 0) -> dict[str, np.ndarray]:
    """The parameters of a freshly initialised SAE of `cfg` (`lgeo_jax.sae.init_params`, our training's start).

    The key is `fold_in(fold_in(key(seed), tag), draw)`, never `key(seed)`: training inits SAEs from
    `key(seed)`, and a null that shared a trained SAE's own starting point would not be independent of it.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NULL_STREAM), draw)
    return {name: np.asarray(value) for name, value in init_params(key, cfg).items()}


def random_init_decoder(width: int, d: int, *, seed: int, draw: int = 0) -> Float[np.ndarray, "F D"]:
    """Decoder rows [width, d] of a freshly initialised SAE (unit-norm Gaussian rows; `random_init_params`)."""
    return random_init_params(SAEConfig(d_in=d, d_sae=width), seed=seed, draw=draw)["W_dec"]


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
        self._spectra: dict[tuple, np.ndarray] = {}
        self._matching: dict[tuple, np.ndarray] = {}
        self._init_matching: dict[tuple, np.ndarray] = {}

    def random_directions(self, m: int, width: int, n: int, d: int) -> RowNull:
        """m (of `width`) random directions against n random directions: `ROW_STATS` per draw and draw 0's
        per-row values."""
        if (m, width, n, d) not in self._directions:
            draws = [compare(_first_rows(_gaussian_rows(width, d, self.seed, r, 0), m),
                             _gaussian_rows(n, d, self.seed, r, 1), (), chunk=self.chunk) for r in range(self.n_draws)]
            self._directions[(m, width, n, d)] = RowNull(np.stack([c.row_summary() for c in draws]), draws[0].rows)
        return self._directions[(m, width, n, d)]

    def random_subspaces(self, k: int, d: int, k2: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of random k- and k2-dim (default k) subspaces of R^d: `ANGLE_STATS` [R, 4] and the angles
        [R, min(k, k2)] themselves."""
        k2 = k if k2 is None else k2
        if (k, k2, d) not in self._subspaces:
            # one trial per call: batched decompositions can deadlock jaxlib's CPU pool (`subspace_resamples`)
            angles = np.concatenate([np.asarray(null_principal_angles(k, d, k2=k2, seed=self.seed + r, n_trials=1))
                                     for r in range(self.n_draws)])  # [R, min(k, k2)]
            self._subspaces[(k, k2, d)] = (angle_stats(angles, self.near_orthogonal, self.aligned), angles)
        return self._subspaces[(k, k2, d)]

    def random_bases(self, s: int, d: int) -> Iterator[np.ndarray]:
        """Orthonormal row bases [s, d] (float64) of `n_draws` random s-dim subspaces of R^d, one at a time (at
        s = d = 3584 they are 100 MB each, so they are drawn again rather than kept)."""
        for r in range(self.n_draws):
            q, _ = np.linalg.qr(_gaussian_rows(s, d, self.seed, r, 2).astype(np.float64).T)  # [d, s]
            yield q.T

    def isotropic_spectra(self, s: int, dof: int) -> np.ndarray:
        """Eigenvalues [R, min(s, dof)] (descending) of `n_draws` Wishart_s(dof) matrices: the scatter of `dof`
        independent isotropic Gaussian rows in an s-dim subspace, i.e. of a centred signal with no structure that
        fills the subspace. Sampled by Bartlett's decomposition W = L L^T (L lower triangular, L_ii^2 ~
        chi^2(dof - i), L_ij ~ N(0, 1) below the diagonal) of the smaller of (s, dof): G^T G and G G^T share
        their non-zero eigenvalues, so this is exact for any s and dof, at O(min(s, dof)^3) per draw."""
        if (s, dof) not in self._spectra:
            p, n = min(s, dof), max(s, dof)
            draws = []
            for r in range(self.n_draws):
                rng = np.random.default_rng([self.seed, _NULL_STREAM, s, dof, r])
                lower = np.tril(rng.standard_normal((p, p)), -1)  # [p, p]
                lower[np.diag_indices(p)] = np.sqrt(rng.chisquare(n - np.arange(p)))
                draws.append(np.linalg.eigvalsh(lower @ lower.T)[::-1])
            self._spectra[(s, dof)] = np.stack(draws)
        return self._spectra[(s, dof)]

    def random_matching(self, m: int, n: int, d: int) -> np.ndarray:
        """Mean Hungarian-matched cosine [R] of m random directions against n (`null_matching`, one seed per draw)."""
        if (m, n, d) not in self._matching:
            self._matching[(m, n, d)] = np.array([null_matching(m, n, d, seed=self.seed + r, chunk=self.chunk)
                                                  for r in range(self.n_draws)])
        return self._matching[(m, n, d)]

    def random_init_matching(self, key: str, width: int, m: int, dictionary_rows: np.ndarray) -> np.ndarray:
        """Mean Hungarian-matched cosine [R] of m rows of the random-init decoders of `random_init` (same draws)
        against the dictionary (`key` names it)."""
        cache_key = (key, width, m)
        if cache_key not in self._init_matching:
            d = dictionary_rows.shape[1]
            self._init_matching[cache_key] = np.array([
                np.mean(matched_cosine(_first_rows(random_init_decoder(width, d, seed=self.seed, draw=r), m),
                                       dictionary_rows, self.chunk)) for r in range(self.n_draws)])
        return self._init_matching[cache_key]

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
