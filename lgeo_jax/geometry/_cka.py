"""Linear CKA (Kornblith et al. 2019), exact, streaming, and the minibatch-unbiased variant (Table 11).

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc = X - mean(X)   [T, P], [T, Q]

Residual-stream activations have means far larger than their spread (h_base at late layers), so the
order of operations matters in float32: each column is first shifted by one of its own samples (which
is exact to the spread's precision), then the mean of the shifted data is removed, and only then are
products formed. Never expand ||Yc^T Xc|| as X^T X - n mu mu^T: that cancels catastrophically.

Streaming (`StreamingCKA`): each batch's mean and centred products are computed on device in float32,
then merged on the host in float64 with the exact pairwise update of centred cross-products
(Chan, Golub & LeVeque 1979):  C = C_a + C_b + (n_a n_b / n) d_x d_y^T  with d = mean_b - mean_a.
The merged result equals the exact CKA of all rows; `merge` combines accumulators from several hosts.

Unbiased (`StreamingCKA(unbiased=True)`): Nguyen, Raghu & Kornblith (2021) average the unbiased HSIC
estimator of Song et al. (2012) over minibatches of at least 4 rows and form CKA from the averages. It
does not converge to the full-data CKA; it removes the small-sample bias of per-batch CKA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

_HI = jax.lax.Precision.HIGHEST


def _center(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column-centred float32 copy and the column mean, robust to means >> spread (shift, then centre)."""
    x = jnp.asarray(x, jnp.float32)
    shift = x[:1]  # [1, P]: one sample, so x - shift is of the spread's size
    shifted = x - shift  # [T, P]
    inner_mean = jnp.mean(shifted, axis=0, keepdims=True)  # [1, P]
    return shifted - inner_mean, (shift + inner_mean)[0]


def _check_pair(x: jax.Array, y: jax.Array, where: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: x {x.shape} and y {y.shape} must be [samples, features] with equal samples")


@jax.jit
def linear_cka(x: Float[Array, "T P"], y: Float[Array, "T Q"]) -> Float[Array, ""]:
    """Exact linear CKA of two activation matrices whose rows are the same samples (float32 on device).

    Uses the cheaper of the feature-space form (P x Q products) and the sample-space form (T x T Gram
    matrices, ||Yc^T Xc||_F^2 = <Kx, Ky>_F); both are centred first.
    """
    _check_pair(x, y, "linear_cka")
    xc, _ = _center(x)  # [T, P]
    yc, _ = _center(y)  # [T, Q]
    t, p = xc.shape
    q = yc.shape[1]
    if t * t * (p + q) < t * (p * p + q * q + p * q):
        kx = jnp.einsum("tp,sp->ts", xc, xc, precision=_HI)  # [T, T]
        ky = jnp.einsum("tq,sq->ts", yc, yc, precision=_HI)  # [T, T]
        cross, self_x, self_y = jnp.vdot(kx, ky), jnp.vdot(kx, kx), jnp.vdot(ky, ky)
    else:
        cxy = jnp.einsum("tp,tq->pq", xc, yc, precision=_HI)  # [P, Q]
        cxx = jnp.einsum("tp,to->po", xc, xc, precision=_HI)  # [P, P]
        cyy = jnp.einsum("tq,tr->qr", yc, yc, precision=_HI)  # [Q, Q]
        cross, self_x, self_y = jnp.vdot(cxy, cxy), jnp.vdot(cxx, cxx), jnp.vdot(cyy, cyy)
    return cross / jnp.sqrt(self_x * self_y)


@jax.jit
def _batch_moments(x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
    xc, mx = _center(x)  # [T, P], [P]
    yc, my = _center(y)  # [T, Q], [Q]
    cxx = jnp.einsum("tp,to->po", xc, xc, precision=_HI)  # [P, P]
    cyy = jnp.einsum("tq,tr->qr", yc, yc, precision=_HI)  # [Q, Q]
    cxy = jnp.einsum("tp,tq->pq", xc, yc, precision=_HI)  # [P, Q]
    return mx, my, cxx, cyy, cxy


def _unbiased_hsic(kx: jax.Array, ky: jax.Array) -> jax.Array:
    """Song et al. (2012) unbiased HSIC of two symmetric [T, T] kernel matrices (T >= 4)."""
    t = kx.shape[0]
    off_diag = 1.0 - jnp.eye(t, dtype=kx.dtype)  # [T, T]
    kx, ky = kx * off_diag, ky * off_diag  # [T, T] zero diagonals (K~, L~)
    kx_rows, ky_rows = kx.sum(axis=1), ky.sum(axis=1)  # [T], [T]: 1^T K~ 1 = sum(kx_rows)
    return (
        jnp.vdot(kx, ky)  # tr(K~ L~)
        + kx_rows.sum() * ky_rows.sum() / ((t - 1) * (t - 2))
        - 2.0 * jnp.vdot(kx_rows, ky_rows) / (t - 2)
    ) / (t * (t - 3))


@jax.jit
def _batch_unbiased_hsic(x: jax.Array, y: jax.Array) -> jax.Array:
    # The estimator is translation invariant; centring only keeps the float32 Gram matrices accurate.
    xc, _ = _center(x)  # [T, P]
    yc, _ = _center(y)  # [T, Q]
    kx = jnp.einsum("tp,sp->ts", xc, xc, precision=_HI)  # [T, T]
    ky = jnp.einsum("tq,sq->ts", yc, yc, precision=_HI)  # [T, T]
    return jnp.stack([_unbiased_hsic(kx, ky), _unbiased_hsic(kx, kx), _unbiased_hsic(ky, ky)])  # [3]


@dataclasses.dataclass
class StreamingCKA:
    """Accumulates linear CKA over batches of paired rows; float64 host state, float32 device products.

    Exact mode keeps n, the means and the centred products X^T X [P, P], Y^T Y [Q, Q], X^T Y [P, Q]
    (3 x 3584^2 float64 = 308 MB at Gemma-9B width). Unbiased mode keeps only the summed per-batch
    HSIC values and the batch count. Each exact update pays a host-side float64 merge of the three
    d x d products (~0.1-0.3 s at d = 3584 on 2 cores), so feed batches of a few thousand rows or more.
    """

    unbiased: bool = False
    n: int = 0
    n_batches: int = 0
    mean_x: np.ndarray | None = None
    mean_y: np.ndarray | None = None
    cxx: np.ndarray | None = None
    cyy: np.ndarray | None = None
    cxy: np.ndarray | None = None
    hsic_sums: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))

    def update(self, x: Float[Array, "T P"], y: Float[Array, "T Q"]) -> StreamingCKA:
        """Adds one batch of rows (same samples in x and y); returns self for chaining."""
        x, y = jnp.asarray(x), jnp.asarray(y)
        _check_pair(x, y, "StreamingCKA.update")
        if self.unbiased:
            if x.shape[0] < 4:
                raise ValueError(f"StreamingCKA.update: unbiased HSIC needs batches of >= 4 rows, got {x.shape[0]}")
            hsic = np.asarray(jax.block_until_ready(_batch_unbiased_hsic(x, y)), np.float64)
            return self.merge(StreamingCKA(unbiased=True, n=x.shape[0], n_batches=1, hsic_sums=hsic))
        # Block first: numpy float64 work must not overlap in-flight JAX CPU work (ENV_NOTES).
        moments = jax.block_until_ready(_batch_moments(x, y))
        mx, my, cxx, cyy, cxy = (np.asarray(m, np.float64) for m in moments)
        return self.merge(StreamingCKA(n=x.shape[0], n_batches=1, mean_x=mx, mean_y=my, cxx=cxx, cyy=cyy, cxy=cxy))

    def merge(self, other: StreamingCKA) -> StreamingCKA:
        """Folds `other` (e.g. another host's accumulator) into self, exactly; returns self."""
        if other.unbiased != self.unbiased:
            raise ValueError("StreamingCKA.merge: cannot merge an unbiased accumulator with an exact one")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.n_batches, self.hsic_sums = other.n, other.n_batches, other.hsic_sums.copy()
            if not self.unbiased:
                self.mean_x, self.mean_y = other.mean_x.copy(), other.mean_y.copy()
                self.cxx, self.cyy, self.cxy = other.cxx.copy(), other.cyy.copy(), other.cxy.copy()
            return self
        if not self.unbiased:
            if other.cxy.shape != self.cxy.shape:
                raise ValueError(f"StreamingCKA.merge: feature dims {other.cxy.shape} != accumulated {self.cxy.shape}")
            n = self.n + other.n
            dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y  # [P], [Q]
            w = self.n * other.n / n
            self.cxx += other.cxx + w * np.outer(dx, dx)
            self.cyy += other.cyy + w * np.outer(dy, dy)
            self.cxy += other.cxy + w * np.outer(dx, dy)
            self.mean_x += dx * (other.n / n)
            self.mean_y += dy * (other.n / n)
        self.n += other.n
        self.n_batches += other.n_batches
        self.hsic_sums = self.hsic_sums + other.hsic_sums
        return self

    def result(self) -> float:
        """CKA of everything accumulated (exact mode), or the minibatch-averaged unbiased CKA."""
        if self.n == 0:
            raise ValueError("StreamingCKA.result: no batches were added")
        if self.unbiased:
            xy, xx, yy = self.hsic_sums / self.n_batches
            return float(xy / np.sqrt(xx * yy))
        return float(np.sum(self.cxy**2) / (np.linalg.norm(self.cxx) * np.linalg.norm(self.cyy)))
