"""Tables 9 and 10: how two SAE dictionaries (decoder matrices [F, D]) relate geometrically.

Table 9: for each live row of dictionary A, the max over rows of B of the signed cosine between unit
rows (|cos| as a variant); summarised by mean, median, % below 0.3 and % above 0.7 (the paper's cuts).
Table 10: principal angles between the top-k right singular subspaces of the row-normalised decoders
(uncentred SVD), summarised by mean, smallest, % >= near_orthogonal and % <= aligned (config degrees).

The same functions summarise every null (random directions, seed-to-seed, base-base, random init), so
a number and its null are always computed identically.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jaxtyping import Float

from lgeo_jax.geometry import max_cosine, principal_angles, top_subspace

COS_LOW, COS_HIGH = 0.3, 0.7  # Table 9's "% < 0.3" and "% > 0.7"


def max_cosine_stats(values: Float[np.ndarray, " M"]) -> dict[str, float | int]:
    """Mean, median, % < 0.3, % > 0.7 of per-row max-cosines (NaN rows, i.e. zero rows, are an error)."""
    values = np.asarray(values, np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"max_cosine_stats: need a non-empty array of finite cosines, got {values.size} values "
                         f"({int(np.sum(~np.isfinite(values)))} not finite; were dead/zero rows passed in?)")
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "pct_below": 100.0 * float(np.mean(values < COS_LOW)),
        "pct_above": 100.0 * float(np.mean(values > COS_HIGH)),
        "n": int(values.size),
    }


def angle_stats(angles_deg: Float[np.ndarray, "... K"], near_orthogonal: float, aligned: float) -> dict:
    """Mean and smallest angle, % >= near_orthogonal, % <= aligned, pooled over any leading (trial) axes."""
    angles = np.asarray(angles_deg, np.float64)
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise ValueError(f"angle_stats: need a non-empty array of finite angles, got shape {angles.shape}")
    return {
        "mean": float(angles.mean()),
        "min": float(angles.min(axis=-1).mean()),  # smallest angle per trial, averaged over trials
        "pct_near_orthogonal": 100.0 * float(np.mean(angles >= near_orthogonal)),
        "pct_aligned": 100.0 * float(np.mean(angles <= aligned)),
        "k": int(angles.shape[-1]),
    }


def live_rows(w_dec: Float[np.ndarray, "F D"], live: np.ndarray | None = None) -> Float[np.ndarray, "F D"]:
    """`w_dec` with every row that is not live (`live` mask, e.g. never fired on the data) set to zero.

    The shape stays [F, D] on purpose: the kernels skip zero rows (max-cosine gives NaN for them, which
    `compare` drops; they add nothing to the Gram matrix of `top_subspace`), and a fixed shape per SAE
    width means one compilation per width instead of one per live count.
    """
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
    return np.asarray(jax.block_until_ready(top_subspace(rows, k, row_normalize=True)))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Raw geometry of dictionary A against dictionary B: per-row max-cosines and principal angles."""

    max_cos: np.ndarray  # [M] signed, one per live (non-zero) row of A
    max_cos_abs: np.ndarray  # [M]
    angles: np.ndarray  # [..., K] degrees, ascending

    def summary(self, near_orthogonal: float, aligned: float) -> dict:
        return {
            "max_cosine": max_cosine_stats(self.max_cos),
            "max_cosine_abs": max_cosine_stats(self.max_cos_abs),
            "angles": angle_stats(self.angles, near_orthogonal, aligned),
        }


def compare(a_rows: Float[np.ndarray, "M D"], b_rows: Float[np.ndarray, "N D"], k: int, *, chunk: int = 512,
            b_basis: np.ndarray | None = None) -> Comparison:
    """Max-cosines of A's rows against B's and the principal angles of their top-k subspaces.

    `a_rows` / `b_rows` are decoder rows with dead rows zeroed (`live_rows`); zero rows take no part.
    `b_basis` may pass B's precomputed `subspace(b_rows, k)` when B is compared many times.
    """
    if a_rows.shape[1] != b_rows.shape[1]:
        raise ValueError(f"compare: dictionaries live in different spaces (d={a_rows.shape[1]} vs {b_rows.shape[1]})")
    live = np.any(a_rows != 0, axis=1)  # [F]
    signed = np.asarray(max_cosine(a_rows, b_rows, chunk=chunk))[live]  # [M]
    absolute = np.asarray(max_cosine(a_rows, b_rows, chunk=chunk, absolute=True))[live]  # [M]
    basis_b = subspace(b_rows, k) if b_basis is None else b_basis  # [K, D]
    angles = np.asarray(jax.block_until_ready(principal_angles(subspace(a_rows, k), basis_b)))  # [K]
    return Comparison(signed, absolute, angles)


def subspace_k(requested: int, *row_counts: int) -> int:
    """Table 10's k: the configured k, capped by the space dimension and every dictionary's row count."""
    k = min(requested, *row_counts)
    if k < 1:
        raise ValueError(f"subspace_k: no live rows to span a subspace (row counts {row_counts})")
    return k
