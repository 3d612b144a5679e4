"""Geometry kernels in torch: max-cosine (Table 9), top singular subspaces and principal angles (Table 10),
linear CKA (Table 11), written the way a careful torch user would.

- Max-cosine normalises rows once and takes ``a`` in row chunks, so only a [C, N] slab of the cosine
  matrix exists at a time (the full 16,384^2 matrix is 1 GiB). Zero rows are dead latents: rows of ``a``
  get NaN / index -1, rows of ``b`` never win.
- Subspaces: `torch.linalg.svd` of the row-normalised decoder (uncentred), top-k right singular vectors
  (or, with ``method="gram"``, the top eigenvectors of the D x D Gram matrix, much faster when M >> k).
  The angles between two such K x D bases are cheap, so they are computed in float64: the cosines are the
  singular values of Qu^T Qv, and for angles below 45 degrees the sines of the residual Qv - Qu Qu^T Qv
  are used instead (Knyazev & Argentati 2002, as `scipy.linalg.subspace_angles`), where arccos is
  inaccurate.
- CKA streams rows in chunks: a float64 mean pass, then centred cross-products (float64 by default, float32
  on request), so inputs may be memory-mapped and means far larger than the spread cost no precision.
"""

from __future__ import annotations

import numpy as np
import torch

from ._threads import set_threads


def _unit_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows (zero rows stay zero) and the mask of non-zero rows."""
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)  # [M, 1]
    live = norm[:, 0] > 0  # [M]
    return w / torch.where(norm > 0, norm, 1.0), live


@torch.inference_mode()
def max_cosine(
    a: np.ndarray, b: np.ndarray, *, chunk: int = 1024, absolute: bool = False, threads: int | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a [M, D]``, the best signed (or absolute) cosine over rows of ``b [N, D]`` and its index.

    Float32 on ``device``. Returns (cos [M], index [M] int64) on the host; NaN / -1 for zero rows of ``a`` or
    when ``b`` has no live row.
    """
    set_threads(threads)
    a_unit, a_live = _unit_rows(torch.as_tensor(np.asarray(a, np.float32), device=device))  # [M, D], [M]
    b_unit, b_live = _unit_rows(torch.as_tensor(np.asarray(b, np.float32), device=device))  # [N, D], [N]
    b_unit, b_index = b_unit[b_live], torch.nonzero(b_live)[:, 0]  # dead rows of b are dropped: [N', D], [N']
    m = a_unit.shape[0]
    best = torch.full((m,), float("nan"), device=device)
    idx = torch.full((m,), -1, dtype=torch.long, device=device)
    if b_unit.shape[0] == 0:
        return best.cpu().numpy(), idx.cpu().numpy()
    for start in range(0, m, chunk):
        cos = a_unit[start:start + chunk] @ b_unit.T  # [C, N']
        if absolute:
            cos.abs_()
        best[start:start + chunk], arg = cos.max(dim=1)  # [C], [C]
        idx[start:start + chunk] = b_index[arg]
    best[~a_live], idx[~a_live] = float("nan"), -1
    return best.cpu().numpy(), idx.cpu().numpy()


@torch.inference_mode()
def top_subspace(
    w: np.ndarray, k: int, *, row_normalize: bool = True, method: str = "svd", threads: int | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Orthonormal [K, D] basis of the top-k right singular vectors of ``w [M, D]`` (uncentred, float32).

    ``method="svd"``: `torch.linalg.svd`; ``"gram"``: the top eigenvectors of W^T W [D, D] (`torch.linalg.eigh`),
    what a careful user switches to when M >> k makes the thin SVD too slow (same subspace wherever the k-th
    singular gap is not tiny).
    """
    set_threads(threads)
    w = torch.as_tensor(np.asarray(w, np.float32), device=device)
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"top_subspace: k={k} must be in [1, min(rows, dim)] for w of shape {tuple(w.shape)}")
    if method not in ("svd", "gram"):
        raise ValueError(f"top_subspace: method={method!r}; expected 'svd' or 'gram'")
    if row_normalize:
        w = _unit_rows(w)[0]
    if method == "gram":
        _, vecs = torch.linalg.eigh(w.T @ w)  # [D, D] columns, ascending eigenvalues
        return vecs[:, -k:].flip(1).T.contiguous().cpu().numpy()  # [K, D], descending
    _, _, vh = torch.linalg.svd(w, full_matrices=False)  # [min(M, D), D], descending singular values
    return vh[:k].clone().cpu().numpy()  # a copy of k rows, so the full [min(M, D), D] factor is freed


@torch.inference_mode()
def principal_angles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between span(rows of ``u [K, D]``) and span(rows of ``v [J, D]``).

    min(K, J) angles, float64; inputs need full row rank, not orthonormality.
    """
    u = torch.as_tensor(np.asarray(u, np.float64))
    v = torch.as_tensor(np.asarray(v, np.float64))
    if u.shape[0] < v.shape[0]:  # the residual is taken of the smaller basis against the larger one
        u, v = v, u
    qu, _ = torch.linalg.qr(u.T)  # [D, K]
    qv, _ = torch.linalg.qr(v.T)  # [D, J]
    overlap = qu.T @ qv  # [K, J]
    cos = torch.linalg.svdvals(overlap)  # [J] descending -> ascending angles
    sin = torch.linalg.svdvals(qv - qu @ overlap).flip(0)  # [J] ascending
    angles = torch.where(cos**2 >= 0.5, torch.arcsin(sin.clamp(-1, 1)), torch.arccos(cos.clamp(-1, 1)))
    return torch.rad2deg(angles).numpy()


def _column_mean(x: np.ndarray, chunk_rows: int) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_rows):
        total += torch.as_tensor(np.asarray(x[start:start + chunk_rows])).double().sum(0)
    return total / x.shape[0]  # [P] float64


@torch.inference_mode()
def linear_cka(x: np.ndarray, y: np.ndarray, *, chunk_rows: int = 16384, dtype: torch.dtype = torch.float64,
               threads: int | None = None, device: str = "cpu") -> float:
    """Linear CKA of ``x [T, P]`` and ``y [T, Q]`` (rows = the same samples), centred.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). Rows are read ``chunk_rows`` at a time; the column
    means are float64, the centred products accumulate in ``dtype`` (float64 default; float32 matches a
    float32 kernel's arithmetic, and centring first keeps it accurate when means are far above the spread);
    the final Frobenius sums are float64 either way (in float32 they alone cost ~2e-4 at D = 2304).
    """
    set_threads(threads)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x {x.shape} and y {y.shape} must be [samples, features] with equal samples")
    to = dict(dtype=dtype, device=device)
    mx, my = _column_mean(x, chunk_rows).to(**to), _column_mean(y, chunk_rows).to(**to)  # [P], [Q]
    p, q = x.shape[1], y.shape[1]
    cxx = torch.zeros(p, p, **to)
    cyy = torch.zeros(q, q, **to)
    cxy = torch.zeros(p, q, **to)
    for start in range(0, x.shape[0], chunk_rows):
        xc = torch.as_tensor(np.asarray(x[start:start + chunk_rows])).to(**to) - mx  # [C, P]
        yc = torch.as_tensor(np.asarray(y[start:start + chunk_rows])).to(**to) - my  # [C, Q]
        cxx.addmm_(xc.T, xc)
        cyy.addmm_(yc.T, yc)
        cxy.addmm_(xc.T, yc)
    cxy, cxx, cyy = cxy.double(), cxx.double(), cyy.double()
    return float(cxy.square().sum() / (torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)))
