"""The geometry kernels as a numpy / scipy user writes them: the baselines users compare a kernel with.

numpy and scipy only (no torch), so a benchmark can run them in a process of their own with the BLAS
settings it chooses. Float32 wherever the JAX kernels are float32 (a float64 baseline would be twice as
slow for no reason a user would accept); principal angles in float64 through scipy, as users call it.

- `max_cosine`: unit rows, then ``a`` in row chunks against all of ``b`` (a [C, N] slab at a time).
  Zero rows are dead latents: rows of ``a`` get NaN / index -1, rows of ``b`` never win.
- `top_subspace`: top-k eigenvectors of the row-normalised decoder's Gram matrix W^T W, the fast route to the
  top right singular vectors when M >> k; only those k are computed (`scipy.linalg.eigh(subset_by_index=...)`,
  LAPACK syevr: 3-4x faster than a full `eigh` at 2304 x 2304, and `numpy.linalg.eigh` is slower still).
- `principal_angles`: `scipy.linalg.subspace_angles` on the bases, in degrees, ascending.
- `linear_cka`: centred feature-space products ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F): float32
  products, float64 reductions (float32 sums of D^2 squares cost ~1e-4 of accuracy at D = 2304).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def _unit_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 rows (zero rows stay zero) and the mask of non-zero rows."""
    w = np.asarray(w, np.float32)
    norm = np.linalg.norm(w, axis=1, keepdims=True)  # [M, 1]
    return w / np.where(norm > 0, norm, 1.0), norm[:, 0] > 0


def max_cosine(a: np.ndarray, b: np.ndarray, *, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a [M, D]``, the best cosine over rows of ``b [N, D]`` and its index (float32)."""
    a_unit, a_live = _unit_rows(a)  # [M, D], [M]
    b_unit, b_live = _unit_rows(b)  # [N, D], [N]
    b_index = np.flatnonzero(b_live)  # [N']
    b_t = np.ascontiguousarray(b_unit[b_index].T)  # [D, N'], transposed once
    best = np.full(a_unit.shape[0], np.nan, np.float32)
    idx = np.full(a_unit.shape[0], -1, np.int64)
    if b_index.size == 0:
        return best, idx
    for start in range(0, a_unit.shape[0], chunk):
        cos = a_unit[start:start + chunk] @ b_t  # [C, N']
        arg = cos.argmax(axis=1)  # [C]
        best[start:start + chunk] = cos[np.arange(arg.size), arg]
        idx[start:start + chunk] = b_index[arg]
    best[~a_live], idx[~a_live] = np.nan, -1
    return best, idx


def top_subspace(w: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal [K, D] basis of the top-k right singular vectors of the row-normalised ``w [M, D]``."""
    w_unit, _ = _unit_rows(w)
    d = w_unit.shape[1]
    _, vecs = scipy.linalg.eigh(w_unit.T @ w_unit, subset_by_index=[d - k, d - 1])  # [D, K], ascending
    return np.ascontiguousarray(vecs[:, ::-1].T)  # [K, D], descending


def principal_angles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between the row spans of ``u [K, D]`` and ``v [J, D]`` (float64)."""
    angles = scipy.linalg.subspace_angles(np.asarray(u, np.float64).T, np.asarray(v, np.float64).T)
    return np.sort(np.degrees(angles))


def subspace_angles(w1: np.ndarray, w2: np.ndarray, k: int) -> np.ndarray:
    """Table 10 for one pair of decoders [M, D]: angles between their top-k subspaces (degrees, ascending)."""
    return principal_angles(top_subspace(w1, k), top_subspace(w2, k))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``x [T, P]`` and ``y [T, Q]`` (same samples), float32, centred before any product."""
    xc = np.asarray(x, np.float32) - np.mean(x, axis=0, dtype=np.float64).astype(np.float32)  # [T, P]
    yc = np.asarray(y, np.float32) - np.mean(y, axis=0, dtype=np.float64).astype(np.float32)  # [T, Q]
    frobenius = lambda m: np.sqrt(np.square(m, dtype=np.float64).sum())
    return float(frobenius(yc.T @ xc) ** 2 / (frobenius(xc.T @ xc) * frobenius(yc.T @ yc)))
