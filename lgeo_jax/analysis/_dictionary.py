"""Tables 9 and 10: how two SAE dictionaries (decoder matrices [F, D]) relate geometrically.

Table 9: for each live row of dictionary A, the max over rows of B of the signed cosine between unit
rows (|cos| as a variant) and whether the two are mutual nearest neighbours; summarised by mean, median,
% below 0.3, % above 0.7 (the paper's cuts), mean |cos| and the mutual-nearest fraction (`ROW_STATS`);
beside them the one-to-one matching's cosines (`matched_cosine`), where no row of B serves two rows of A.
Table 10: principal angles between the top-k right singular subspaces of the row-normalised decoders
(uncentred SVD) for each k of a sweep, summarised by mean, smallest, % >= near_orthogonal and % <=
aligned (`ANGLE_STATS`), beside the share of A's spectrum (energy) in its top k.

Uncertainty comes from resampling A's live latents (rows) with replacement, B fixed: Table 9 by
`lgeo_jax.stats.bootstrap_items` on the per-row values, Table 10 by recomputing A's top-k subspace from
the reweighted rows (`subspace_resamples`, the same resamples for the same seed). Intervals are percentile
intervals: a resample repeats some latents and drops others, which makes its top-k subspace noisier, so its
angles drift toward the random level and the interval can sit beside its point (the report marks that);
the drift is toward the null, so it makes a verdict harder to reach, never easier (on decoders sampled from a
population with a known subspace the percentile interval covers its angle in 95% of repeats, the basic one
in about 80%: `tests/test_analysis.py`). The same functions
summarise every null (random directions, random init, seed-to-seed, base-base), so a number and its
null are always computed identically.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from lgeo_jax.geometry import hungarian_match, max_cosine, normalize_rows, principal_angles, top_subspace
from lgeo_jax.stats import resample_counts

COS_LOW, COS_HIGH = 0.3, 0.7  # Table 9's "% < 0.3" and "% > 0.7"
ROW_STATS = ("mean", "median", "pct_below", "pct_above", "abs_mean", "mnn")
ANGLE_STATS = ("mean", "min", "pct_near_orthogonal", "pct_aligned")
_RESAMPLE_BYTES = 256 * 2**20  # device memory for one chunk of reweighted decoders


def row_stats(values: Float[np.ndarray, "... M 3"], axis: int = 0) -> Float[np.ndarray, "... 6"]:
    """`ROW_STATS` over the row axis of per-row [signed max-cos, |max-cos|, mutual-nearest 0/1] values."""
    values = np.asarray(values, np.float64)
    signed, absolute, mutual = (np.take(values, i, axis=-1) for i in range(3))
    row_axis = axis if axis >= 0 else axis + 1  # the axis index within one column
    return np.stack([signed.mean(axis=row_axis), np.median(signed, axis=row_axis),
                     100.0 * np.mean(signed < COS_LOW, axis=row_axis),
                     100.0 * np.mean(signed > COS_HIGH, axis=row_axis),
                     absolute.mean(axis=row_axis), mutual.mean(axis=row_axis)], axis=-1)


def angle_stats(angles: Float[np.ndarray, "... K"], near_orthogonal: float, aligned: float) -> np.ndarray:
    """`ANGLE_STATS` [..., 4] of principal angles in degrees (last axis)."""
    angles = np.asarray(angles, np.float64)
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise ValueError(f"angle_stats: need a non-empty array of finite angles, got shape {angles.shape}")
    return np.stack([angles.mean(axis=-1), angles.min(axis=-1), 100.0 * np.mean(angles >= near_orthogonal, axis=-1),
                     100.0 * np.mean(angles <= aligned, axis=-1)], axis=-1)


def live_rows(w_dec: Float[np.ndarray, "F D"], live: np.ndarray | None = None) -> Float[np.ndarray, "F D"]:
    """`w_dec` with every row that is not live set to zero (the shape stays [F, D]: the kernels skip zero
    rows, and a fixed shape per SAE width means one compilation per width instead of one per live count)."""
    w_dec = np.asarray(w_dec, np.float32)
    if live is None:
        return w_dec
    live = np.asarray(live, bool)
    if live.shape != w_dec.shape[:1]:
        raise ValueError(f"live_rows: live mask {live.shape} does not match decoder rows {w_dec.shape}")
    return np.where(live[:, None], w_dec, 0.0).astype(np.float32)


def count_rows(w: Float[np.ndarray, "F D"]) -> int:
    """Non-zero (live) rows of a `live_rows` matrix."""
    return int(np.sum(np.any(w != 0, axis=1)))


def subspace(rows: Float[np.ndarray, "M D"], k: int) -> Float[np.ndarray, "K D"]:
    """Orthonormal top-k right singular basis of the row-normalised rows (docs/conventions.md, Table 10)."""
    return np.asarray(top_subspace(rows, k, row_normalize=True))


def spectrum(rows: Float[np.ndarray, "F D"]) -> Float[np.ndarray, " D"]:
    """Squared singular values of the unit live rows, descending, as shares of their total (sum = 1)."""
    unit, live = normalize_rows(rows)  # [F, D]: zero rows stay zero (one compilation per width)
    gram = jnp.einsum("md,me->de", unit, unit, precision=jax.lax.Precision.HIGHEST)  # [D, D]
    values = np.asarray(jnp.linalg.eigvalsh(gram), np.float64)[::-1]
    return np.maximum(values, 0.0) / int(live.sum())  # the trace of the Gram of unit rows is their count


def matched_cosine(a_rows: Float[np.ndarray, "F D"], b_rows: Float[np.ndarray, "N D"], chunk: int) -> np.ndarray:
    """[A] cosines of the one-to-one matching of A's live rows to B's that maximises their total
    (`lgeo_jax.geometry.hungarian_match`; A = min of the live counts): unlike max-cosine, no row of B serves two."""
    return hungarian_match(a_rows, b_rows, chunk=chunk)[2].astype(np.float64)


def mutual_nearest(a_rows: np.ndarray, b_rows: np.ndarray, a_to_b: np.ndarray, chunk: int) -> np.ndarray:
    """[F] 1 where row i of A and its nearest row of B (`a_to_b`, -1 for dead rows) pick each other
    (as `lgeo_jax.geometry.mutual_nearest_fraction`, per row)."""
    _, b_to_a = max_cosine(b_rows, a_rows, chunk=chunk, return_index=True)  # [N]
    b_to_a = np.asarray(b_to_a)
    return (a_to_b >= 0) & (b_to_a[np.maximum(a_to_b, 0)] == np.arange(a_to_b.size))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Raw geometry of dictionary A against dictionary B."""

    rows: np.ndarray  # [M, 3] per live row of A: signed max-cos, |max-cos|, mutual nearest (0/1)
    angles: dict[int, np.ndarray]  # k -> [k] principal angles (degrees, ascending) of the top-k subspaces

    def row_summary(self) -> np.ndarray:
        return row_stats(self.rows)

    def angle_summary(self, near_orthogonal: float, aligned: float) -> dict[int, np.ndarray]:
        return {k: angle_stats(a, near_orthogonal, aligned) for k, a in self.angles.items()}


def compare(a_rows: Float[np.ndarray, "M D"], b_rows: Float[np.ndarray, "N D"], ks: Sequence[int], *,
            chunk: int = 512, b_basis: np.ndarray | None = None) -> Comparison:
    """Per-row max-cosines and mutual nearest neighbours of A's rows against B's, and the principal angles of
    their top-k subspaces for every k in `ks` (one eigendecomposition each, at the largest k; none for `ks=()`).

    `a_rows` / `b_rows` are decoder rows with dead rows zeroed (`live_rows`); zero rows take no part.
    `b_basis` may pass B's precomputed `subspace(b_rows, max(ks))`.
    """
    if a_rows.shape[1] != b_rows.shape[1]:
        raise ValueError(f"compare: dictionaries live in different spaces (d={a_rows.shape[1]} vs {b_rows.shape[1]})")
    live = np.any(a_rows != 0, axis=1)  # [F]
    signed, a_to_b = max_cosine(a_rows, b_rows, chunk=chunk, return_index=True)  # [F], [F]
    absolute = max_cosine(a_rows, b_rows, chunk=chunk, absolute=True)  # [F]
    mutual = mutual_nearest(a_rows, b_rows, np.asarray(a_to_b), chunk)
    rows = np.stack([np.asarray(signed), np.asarray(absolute), mutual], axis=1)[live]  # [M, 3]
    if not ks:
        return Comparison(rows, {})
    k_max = max(ks)
    basis_b = subspace(b_rows, k_max) if b_basis is None else b_basis  # [K, D]
    basis_a = subspace(a_rows, k_max)  # [K, D]
    angles = {k: np.asarray(principal_angles(basis_a[:k], basis_b[:k])) for k in ks}
    return Comparison(rows, angles)


@functools.partial(jax.jit, static_argnames=("ks",))
def _resampled_angles(unit: jax.Array, weights: jax.Array, b_basis: jax.Array, ks: tuple[int, ...]) -> tuple:
    """Principal angles [b, k] for each k of each reweighted decoder's top-k subspace against `b_basis`.

    One resample at a time (`lax.map`), on purpose: jaxlib's CPU LAPACK kernels split a *batched*
    decomposition over the same small thread pool that runs independent kernels side by side, and two
    batched QRs at once deadlocked that pool on a 2-core machine (every worker waiting for the others).
    Accelerators gain little from batching d x d eigendecompositions anyway.
    """

    def one(w: jax.Array) -> tuple[jax.Array, ...]:
        basis = top_subspace(jnp.sqrt(w)[:, None] * unit, max(ks))  # [K, D]: sum_i w_i u_i u_i^T's top k
        return tuple(principal_angles(basis[:k], b_basis[:k]) for k in ks)  # [k] each

    return jax.lax.map(one, weights)


def subspace_resamples(a_rows: Float[np.ndarray, "F D"], b_basis: Float[np.ndarray, "K D"], ks: Sequence[int], *,
                       n_boot: int, seed: int, near_orthogonal: float, aligned: float) -> dict[int, np.ndarray]:
    """Table 10 under a latent bootstrap of A: `{k: [n_boot, 4]}` `ANGLE_STATS` of each resample.

    Resample r weighs A's unit live rows by how often it drew them (`lgeo_jax.stats.resample_counts`, the
    draws of `bootstrap_items` with the same seed), so its Gram matrix is sum_i w_i u_i u_i^T, and takes
    that matrix's top-k subspace against B's fixed basis. One eigendecomposition per resample serves
    every k of the sweep.
    """
    unit, live = normalize_rows(a_rows)  # [F, D], dead rows zero: shapes fixed per width, not per live count
    rows = np.flatnonzero(np.asarray(live))  # [M]
    f, d = unit.shape
    ks = tuple(ks)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for counts in resample_counts(rows.size, n_boot, seed=seed, bytes_per_resample=4 * f * d,
                                  chunk_bytes=_RESAMPLE_BYTES):
        weights = np.zeros((counts.shape[0], f), np.float32)  # [b, F]
        weights[:, rows] = counts
        angles = _resampled_angles(unit, jnp.asarray(weights), jnp.asarray(b_basis), ks)  # ([b, k] per k)
        for k, a in zip(ks, angles, strict=True):
            out[k].append(angle_stats(np.asarray(a), near_orthogonal, aligned))
    return {k: np.concatenate(v) for k, v in out.items()}


def subspace_k(requested: int, *row_counts: int) -> int:
    """Table 10's k: the configured k, capped by the space dimension and every dictionary's row count."""
    k = min(requested, *row_counts)
    if k < 1:
        raise ValueError(f"subspace_k: no live rows to span a subspace (row counts {row_counts})")
    return k
