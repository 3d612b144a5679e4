"""LoRA-weight linkage: does δ at layer L live where the adapter can write, and how many directions does it use?

The write span of an adapter by layer L is the union of the column spaces of its scaled update matrices
s_l B_l A_l (PEFT layout, [D, In]) for every block l <= L whose output is added to the residual stream: o_proj
and, when it is a target, the MLP's down_proj. Only these write into the residual directly; a q/k/v (or
gate/up) adapter reaches it through the base o_proj / down_proj, whose columns span the whole space, so a δ
caused by those lies outside the span, and `delta_variance_in_span` measures the share of δ that the direct
writes can explain. Gemma-2 also passes each sub-block's output through its post-norm (x / rms(x) * (1 + w))
before the residual add: this rescales coordinates by (1 + w) and adds a component along the base output, so
the span here is that of the LoRA factors themselves, as the issue defines it; the base weights are not read.

Basis: with our factors a [In, R], b [R, D] (x a b = PEFT's B A x) and a = Q R (reduced QR), s (a b)^T = s b^T
R^T Q^T, so C_l = s b^T R^T [D, R] has the same column space and singular values as the [D, In] product, at
R columns instead of In. The left singular vectors of [C_0 | C_1 | ...] whose singular value exceeds `rtol`
times the largest form the orthonormal basis (scipy.linalg.orth's rule with rcond = rtol); its size is the
span's dimension S (at most D, and at most the sum of the ranks).

Metrics per (adapter, layer), on the evaluation split's δ [T, D]:
* `delta_variance_in_span`: sum_t ||P δ_t||^2 / sum_t ||δ_t||^2, the *uncentred* share (δ's mean, a
  constant shift the adapter adds, is part of what it writes); prompt-bootstrap interval (`lgeo_jax.stats`).
  Null: the same share in random S-dim subspaces (Monte Carlo; its mean is S / D for any δ).
* `effective_rank`: participation ratio (sum λ)^2 / sum λ^2 of δ's *centred* covariance spectrum, with the
  basic prompt-bootstrap interval (`PromptCKA.participation_ratio`, paired with CKA's resamples), and
  `components_90` / `components_99`, the fewest principal components holding 90% / 99% of the variance,
  beside the adapter's rank r. Null: a structureless signal filling a random S-dim subspace, T - 1 independent
  isotropic Gaussian rows (Wishart draws); a verdict of -1 says δ uses fewer directions than such a signal.
* `angles_sae_vs_span` / `angles_pca_vs_span`: principal angles (`ANGLE_STATS`, min(k, S) angles) between the
  span and the delta SAE's top-k decoder subspace (row-normalised live rows, Table 10's convention; mean over
  seeds) / δ's top-k principal components; k = the analysis section's `subspace_k`, capped by the sizes. Null:
  random k- and S-dim subspaces. These are not means over rows: the verdict compares the point with the null's
  interval, as do the component counts.
When the span fills the space (S = D; tiny models at rank 32 reach it early) every δ lies in it: the share is
exactly 1 and the angles 0, as are their nulls, and the record says so (`span_fills_space`) instead of
comparing rounding errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._cka import PromptCKA
from lgeo_jax.analysis._config import AnalysisConfig
from lgeo_jax.analysis._dictionary import ANGLE_STATS, angle_stats, count_rows, subspace, subspace_k
from lgeo_jax.analysis._nulls import NullCache
from lgeo_jax.geometry import principal_angles
from lgeo_jax.lora import PEFT_NAMES, LoraAdapters
from lgeo_jax.stats import Interval, PromptSums, bias_corrected, bootstrap, null_interval, vs_null

WRITE_TARGETS = ("o", "down")  # the projections whose outputs are added to the residual stream
SHARES = (0.9, 0.99)  # `components_90`, `components_99`
_CHUNK_BYTES = 64 * 2**20  # device memory for one chunk of δ rows and its projections


@dataclasses.dataclass(frozen=True)
class LoraSpan:
    """The orthonormal basis [S, D] (float64 rows) of an adapter's write span by one layer, and what made it."""

    basis: np.ndarray
    singular_values: np.ndarray  # [min(D, sum of ranks)] of the stacked write matrices, descending
    layers: tuple[int, ...]  # blocks whose writes were included
    targets: tuple[str, ...]  # write targets the adapter has ("o", "down")
    rtol: float
    rank: int  # the adapter's LoRA rank r

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])


def write_matrices(adapters: LoraAdapters, layer: int, d_model: int, *, index: int = 0) -> list[np.ndarray]:
    """C_l [D, R] (float64) per write target and block l <= `layer` of adapter `index`: the column space and
    singular values of its scaled update s_l B_l A_l (module docstring)."""
    out = []
    for target in (t for t in WRITE_TARGETS if t in adapters.targets):
        a, b, scale = (np.asarray(x, np.float64) for x in adapters.factors(target))  # [L, n, In, R], [L, n, R, D]
        if b.shape[-1] != d_model:
            raise ValueError(f"adapter {adapters.specs[index].name!r}: {PEFT_NAMES[target]} writes {b.shape[-1]}-wide "
                             f"outputs but the residual stream has d_model {d_model}; the adapter belongs to "
                             "another model")
        for block in range(min(layer + 1, a.shape[0])):
            r = np.linalg.qr(a[block, index], mode="r")  # [min(In, R), R]: a = Q R
            out.append(scale[block, index] * b[block, index].T @ r.T)  # [D, min(In, R)]
    return out


def lora_span(adapters: LoraAdapters, layer: int, d_model: int, *, rtol: float, index: int = 0) -> LoraSpan:
    """The write span of adapter `index` by `layer` (module docstring); an empty basis [0, D] when the adapter has
    no write target (o_proj, down_proj) at any block <= layer."""
    parts = write_matrices(adapters, layer, d_model, index=index)
    targets = tuple(t for t in WRITE_TARGETS if t in adapters.targets)
    layers = tuple(range(min(layer + 1, adapters.n_layers()))) if targets else ()
    rank = adapters.specs[index].rank
    if not parts:
        return LoraSpan(np.zeros((0, d_model)), np.zeros(0), layers, targets, rtol, rank)
    u, sv, _ = np.linalg.svd(np.concatenate(parts, axis=1), full_matrices=False)  # [D, K], [K]
    keep = sv > rtol * sv[0] if sv[0] > 0 else np.zeros(sv.shape, bool)
    return LoraSpan(np.ascontiguousarray(u[:, keep].T), sv, layers, targets, rtol, rank)


@jax.jit
def _chunk_moments(x: jax.Array, basis: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One row chunk [C, D]: its second moment [D, D], in-span energies [C] and squared norms [C]."""
    second = jnp.einsum("td,te->de", x, x, precision=jax.lax.Precision.HIGHEST)  # [D, D]
    in_span = jnp.sum(jnp.square(jnp.einsum("td,sd->ts", x, basis, precision=jax.lax.Precision.HIGHEST)),
                      axis=1)  # [T]
    return second, in_span, jnp.sum(jnp.square(x), axis=1)


def token_moments(delta: Float[np.ndarray, "T D"], basis: Float[np.ndarray, "S D"]) -> tuple[np.ndarray, ...]:
    """δ's uncentred second moment sum_t δ_t δ_t^T [D, D] and sum [D] (float64), and per token ||P δ_t||^2 and
    ||δ_t||^2 [T]: float32 on the device at HIGHEST precision, row chunks summed in float64 on the host."""
    t, d = delta.shape
    rows = max(1, _CHUNK_BYTES // (4 * max(d, basis.shape[0], 1)))
    second = np.zeros((d, d))
    in_span, norms = np.zeros(t), np.zeros(t)
    basis32 = jnp.asarray(basis, jnp.float32)
    for start in range(0, t, rows):
        x = jnp.asarray(delta[start:start + rows], jnp.float32)  # [C, D]
        m, e, n = _chunk_moments(x, basis32)
        second += np.asarray(m, np.float64)
        in_span[start:start + rows], norms[start:start + rows] = np.asarray(e), np.asarray(n)
    return second, np.sum(delta, axis=0, dtype=np.float64), in_span, norms


def components(eigenvalues: np.ndarray, share: float) -> int:
    """The fewest leading (descending) eigenvalues whose sum reaches `share` of the total."""
    cum = np.cumsum(eigenvalues) / np.sum(eigenvalues)
    return int(np.searchsorted(cum, share - 1e-12) + 1)


def _spectrum_stats(eigenvalues: np.ndarray) -> np.ndarray:
    """[participation ratio, components_90, components_99] of a (descending, non-negative) spectrum."""
    lam = np.maximum(eigenvalues, 0.0)
    return np.array([lam.sum() ** 2 / np.sum(lam**2), *(components(lam, s) for s in SHARES)], np.float64)


def _shown(estimate: Interval, null: Interval) -> dict:
    """A number with its interval (when it has one), its verdict against its null and the null itself."""
    out = {"value": float(estimate.point)}
    if estimate.n_draws:
        out |= {"ci_low": float(estimate.low), "ci_high": float(estimate.high)}
    return out | {"vs_null": vs_null(estimate, null), "null": {"value": float(null.point),
                                                               "ci_low": float(null.low), "ci_high": float(null.high)}}


def span_record(span: LoraSpan, delta: Float[np.ndarray, "T D"], sample_index: np.ndarray, cka: PromptCKA,
                delta_name: str, sae_rows: Mapping[int, np.ndarray], config: AnalysisConfig,
                nulls: NullCache) -> dict:
    """The `lora_span` record of one (adapter, layer) (module docstring). `delta` [T, D] and `sample_index` [T]
    are the evaluation split's rows; `cka` holds δ under `delta_name` (its Gram is shared with Table 11);
    `sae_rows` the delta SAE's live decoder rows per seed (`live_rows`)."""
    c = config
    t, d = delta.shape
    record: dict = {"rank": span.rank, "d_model": d, "span_dim": span.dim, "span_fills_space": span.dim == d,
                    "span_rtol": span.rtol, "span_layers": list(span.layers),
                    "span_targets": [PEFT_NAMES[x] for x in span.targets],
                    "variance": "uncentred: sum_t ||P delta_t||^2 / sum_t ||delta_t||^2"}
    if span.dim == 0:
        record["note"] = "the adapter writes nothing directly into the residual stream by this layer"
        return record
    second, total, in_span, norms = token_moments(delta, span.basis)
    level, boot = c.confidence, {"n_boot": c.n_boot, "seed": c.boot_seed, "level": c.confidence}

    # effective rank: the centred covariance spectrum against a structureless signal filling an S-dim subspace
    mean = total / t
    eigenvalues, vectors = np.linalg.eigh(second / t - np.outer(mean, mean))  # ascending
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    stats = _spectrum_stats(eigenvalues)
    null = null_interval(np.stack([_spectrum_stats(e) for e in nulls.isotropic_spectra(span.dim, t - 1)]), level=level)
    pr = cka.participation_ratio(delta_name, **boot)
    record["effective_rank"] = {**_shown(pr, null[0]), "bias_corrected": float(bias_corrected(pr.point, pr.samples))}
    for i, share in enumerate(SHARES, start=1):
        record[f"components_{round(100 * share)}"] = _shown(Interval.exact(stats[i]), null[i])

    k = subspace_k(c.subspace_k, d, t - 1, *(count_rows(r) for r in sae_rows.values()))
    record["k"] = k
    near, aligned = c.near_orthogonal_deg, c.aligned_deg
    if span.dim == d:  # every direction is in the span: exact values, nothing to compare
        exact = {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "vs_null": 0,
                 "null": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}}
        record["delta_variance_in_span"] = exact
        zero = angle_stats(np.zeros(k), near, aligned)
        for name in ("angles_sae_vs_span", "angles_pca_vs_span"):
            record[name] = {n: {"value": float(zero[i]), "vs_null": 0,
                                "null": {"value": float(zero[i]), "ci_low": float(zero[i]), "ci_high": float(zero[i])}}
                            for i, n in enumerate(ANGLE_STATS)}
        return record

    sums = PromptSums().add(sample_index, {"in_span": in_span, "total": norms}).sums
    share = bootstrap(sums, lambda s: s["in_span"] / s["total"], **boot)
    draws = [np.sum((q @ second) * q) / np.trace(second) for q in nulls.random_bases(span.dim, d)]
    record["delta_variance_in_span"] = _shown(share, null_interval(np.array(draws), level=level))

    angle_null = null_interval(nulls.random_subspaces(k, d, span.dim)[0], level=level)  # [4]
    per_seed = {s: angle_stats(np.asarray(principal_angles(subspace(rows, k), span.basis)), near, aligned)
                for s, rows in sae_rows.items()}
    sae_stats = np.mean(list(per_seed.values()), axis=0)
    pca_stats = angle_stats(np.asarray(principal_angles(vectors[:, :k].T, span.basis)), near, aligned)
    for name, point in (("angles_sae_vs_span", sae_stats), ("angles_pca_vs_span", pca_stats)):
        record[name] = {n: _shown(Interval.exact(point[i]), angle_null[i]) for i, n in enumerate(ANGLE_STATS)}
    record["angles_sae_vs_span"]["per_seed_mean"] = {str(s): float(v[0]) for s, v in per_seed.items()}
    return record
