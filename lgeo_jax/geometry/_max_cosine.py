"""Max-cosine between two dictionaries: for each row of `a`, its best-matching row of `b`.

This is Table 9's statistic (delta-SAE decoder rows vs Gemma Scope decoder rows). At paper scale the
full cosine matrix is 16,384 x 16,384 floats (1 GiB), so rows of `a` are processed in chunks with
`lax.map`: only a [C, N] slab exists at a time. Leading axes (adapter, layer, ...) are vmapped.

Einsum letters (the package docstring lists them all): M rows of a, N rows of b, C rows in a chunk,
D feature dim.

Zero rows are dead latents. Rows of `a` that are zero get NaN (and index -1) so a caller that forgets to
mask them sees it; rows of `b` that are zero never win the max (they are excluded, not counted as
cosine 0). If every row of `b` is zero the result is NaN. "Zero" means the squared norm is 0 in float32
(including underflow, i.e. norm below ~1e-19).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def normalize_rows(w: Float[Array, "... M D"]) -> tuple[Float[Array, "... M D"], jax.Array]:
    """Unit-norm rows in float32 and a boolean mask of the rows that were non-zero (live).

    Zero rows stay zero (not NaN) so downstream matmuls stay finite; use the mask to handle them.
    """
    w = jnp.asarray(w, jnp.float32)
    sq = jnp.einsum("...md,...md->...m", w, w, precision=jax.lax.Precision.HIGHEST)  # [..., M]
    live = sq > 0
    inv = jnp.where(live, jax.lax.rsqrt(jnp.where(live, sq, 1.0)), 0.0)  # [..., M]
    return w * inv[..., None], live


@functools.partial(jax.jit, static_argnames=("chunk", "absolute", "precision"))
def _max_cosine_2d(
    a: jax.Array, b: jax.Array, chunk: int, absolute: bool, precision: str
) -> tuple[jax.Array, jax.Array]:
    m, d = a.shape
    a_unit, a_live = normalize_rows(a)  # [M, D], [M]
    b_unit, b_live = normalize_rows(b)  # [N, D], [N]
    n_chunks = -(-m // chunk)
    pad = n_chunks * chunk - m
    a_chunks = jnp.pad(a_unit, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)  # [M/C, C, D]

    def one_chunk(a_c: jax.Array) -> tuple[jax.Array, jax.Array]:
        cos = jnp.einsum("cd,nd->cn", a_c, b_unit, precision=_PRECISIONS[precision])  # [C, N]
        if absolute:
            cos = jnp.abs(cos)
        cos = jnp.where(b_live[None, :], cos, -jnp.inf)  # [C, N]: dead b rows never win
        return jnp.max(cos, axis=1), jnp.argmax(cos, axis=1).astype(jnp.int32)  # [C], [C]

    best, idx = jax.lax.map(one_chunk, a_chunks)  # [M/C, C] each
    best, idx = best.reshape(-1)[:m], idx.reshape(-1)[:m]  # [M]
    valid = a_live & jnp.any(b_live)  # [M]
    return jnp.where(valid, best, jnp.nan), jnp.where(valid, idx, -1)


def max_cosine(
    a: Float[Array, "*batch M D"],
    b: Float[Array, "*batch N D"],
    *,
    chunk: int = 512,
    absolute: bool = False,
    return_index: bool = False,
    precision: str = "highest",
) -> Float[Array, "*batch M"] | tuple[Float[Array, "*batch M"], Int[Array, "*batch M"]]:
    """For each row of `a`, max over rows of `b` of cos(a_i, b_j) (or |cos| with `absolute=True`).

    Rows are normalised inside (float32); the argmax (first on ties) comes back with `return_index`.
    Leading axes of `a` and `b` must match and are vmapped (e.g. [adapter, layer, M, D]), so they can be
    sharded across devices; scratch memory is one normalised copy of the inputs plus a [C, N] slab per
    batch element (~0.5 GiB per 16k x 16k x 3584 pair). Zero rows:
    see the module docstring (NaN / -1 for zero rows of `a`; zero rows of `b` are excluded).
    `precision="highest"` keeps float32 matmuls on accelerators that default to bf16/TF32 passes.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"max_cosine: a {a.shape} and b {b.shape} must be [..., rows, dim]")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"max_cosine: a {a.shape} and b {b.shape} need equal leading (batch) axes and feature dim")
    if chunk < 1:
        raise ValueError(f"max_cosine: chunk={chunk} must be >= 1")
    if precision not in _PRECISIONS:
        raise ValueError(f"max_cosine: precision={precision!r}; expected one of {sorted(_PRECISIONS)}")
    if a.shape[-2] == 0 or b.shape[-2] == 0:
        raise ValueError(f"max_cosine: a {a.shape} and b {b.shape} need at least one row each")
    fn = functools.partial(_max_cosine_2d, chunk=min(chunk, a.shape[-2]), absolute=absolute, precision=precision)
    for _ in range(a.ndim - 2):
        fn = jax.vmap(fn)
    best, idx = fn(a, b)
    return (best, idx) if return_index else best
