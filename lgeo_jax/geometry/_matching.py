"""One-to-one feature matching between two dictionaries, and mutual nearest neighbours.

Max-cosine (Table 9) lets many rows of `a` pick the same row of `b`; these statistics do not:

* `hungarian_match`: the assignment of rows of a [M, D] to rows of b [N, D] (each used at most once) that
  maximises the total cosine, min(M, N) pairs. The cosine matrix is built on the device in row blocks of
  `chunk` (float32, matmuls at HIGHEST precision) and assembled on the host, where
  `scipy.optimize.linear_sum_assignment` (shortest augmenting paths, Crouse 2016) solves it: only a
  [C, N] block exists on the device at a time, the host holds the [M, N] float32 matrix (1 GiB at
  16,384 x 16,384) plus scipy's float64 working copy. The assignment is optimal for the float32 costs,
  so its true total is within 2 * pairs * (float32 cosine error, ~1e-6) of the float64 optimum.
* `mutual_nearest_fraction`: the fraction of rows of `a` whose max-cosine partner in `b` picks them back.

Zero rows are dead latents (squared norm 0 in float32, as in `max_cosine`): they are never matched.

Einsum letters (the package docstring lists them all): M rows of a, N rows of b, C rows in a block,
D feature dim, A matched pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lgeo_jax.geometry._max_cosine import max_cosine, normalize_rows


@functools.partial(jax.jit, static_argnames=("chunk", "absolute"))
def _cosine_block(a_unit: jax.Array, b_unit: jax.Array, start: int, chunk: int, absolute: bool) -> jax.Array:
    # `start` is traced, so one kernel serves every block; dynamic_slice clamps the last block to end at M.
    a_c = jax.lax.dynamic_slice_in_dim(a_unit, start, chunk, axis=0)  # [C, D]
    cos = jnp.einsum("cd,nd->cn", a_c, b_unit, precision=jax.lax.Precision.HIGHEST)  # [C, N]
    return jnp.abs(cos) if absolute else cos


def _cosine_matrix(a_unit: jax.Array, b_unit: jax.Array, chunk: int, absolute: bool) -> np.ndarray:
    """[M, N] float32 cosines of unit rows (M, N >= 1) on the host, computed on the device C rows at a time."""
    m, n = a_unit.shape[0], b_unit.shape[0]
    block = min(chunk, m)
    cost = np.empty((m, n), np.float32)  # [M, N]
    for start in range(0, m, block):
        start = min(start, m - block)  # the clamp dynamic_slice applies to the last block
        # np.asarray waits for the block, so no JAX work is in flight when the caller hands `cost` to scipy
        # (ENV_NOTES: numpy/scipy LAPACK next to running JAX CPU work is ~20x slower).
        cost[start : start + block] = np.asarray(_cosine_block(a_unit, b_unit, start, block, absolute))
    return cost


def hungarian_match(
    a: Float[Array, "M D"], b: Float[Array, "N D"], *, chunk: int = 512, absolute: bool = False
) -> tuple[Int[np.ndarray, " A"], Int[np.ndarray, " A"], Float[np.ndarray, " A"]]:
    """Maximum-total-cosine one-to-one matching of the rows of `a` to the rows of `b`.

    Cosine of unit-normalised rows (|cos| with `absolute=True`). Returns numpy arrays `rows` [A] (int64,
    ascending), `cols` [A] (int64) and `cos` [A] (float32, the matched cosines), with a[rows[i]] matched to
    b[cols[i]] and A = min(live rows of a, live rows of b); zero (dead) rows are left unmatched, and if
    either side has none the arrays are empty. Needs scipy (imported here, so the package imports without
    it). Host memory: see the module docstring.
    """
    import scipy.optimize

    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"hungarian_match: a {a.shape} and b {b.shape} must be [rows, dim] with equal dim")
    if chunk < 1:
        raise ValueError(f"hungarian_match: chunk={chunk} must be >= 1")
    a_unit, a_live = normalize_rows(a)  # [M, D], [M]
    b_unit, b_live = normalize_rows(b)  # [N, D], [N]
    rows_live, cols_live = np.flatnonzero(np.asarray(a_live)), np.flatnonzero(np.asarray(b_live))
    if rows_live.size == 0 or cols_live.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    cost = _cosine_matrix(a_unit[rows_live], b_unit[cols_live], chunk, absolute)  # [M, N] over the live rows
    rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=True)  # [A], [A]; rows ascending
    return rows_live[rows], cols_live[cols], cost[rows, cols]


def mutual_nearest_fraction(
    a: Float[Array, "*batch M D"], b: Float[Array, "*batch N D"], *, chunk: int = 512, absolute: bool = False
) -> Float[Array, "*batch"]:
    """Fraction of the live rows of `a` whose nearest row of `b` (max cosine) has them as its nearest row.

    Runs `max_cosine` both ways (chunked, float32; leading axes batch as there; first index on ties).
    Dead rows of `a` are left out of the fraction and dead rows of `b` never win; NaN when `a` has no live
    row or `b` none at all.
    """
    _, a_to_b = max_cosine(a, b, chunk=chunk, absolute=absolute, return_index=True)  # [..., M], -1 if dead
    _, b_to_a = max_cosine(b, a, chunk=chunk, absolute=absolute, return_index=True)  # [..., N]
    back = jnp.take_along_axis(b_to_a, jnp.maximum(a_to_b, 0), axis=-1)  # [..., M]: a_to_b's pick's pick
    matched = a_to_b >= 0  # [..., M]
    mutual = matched & (back == jnp.arange(a_to_b.shape[-1]))  # [..., M]
    return jnp.sum(mutual, axis=-1) / jnp.sum(matched, axis=-1)
