"""The `analysis` section: the reference dictionary (Gemma Scope or any SAE directory), geometry
thresholds, null baselines and the resampling behind every interval."""

from __future__ import annotations

import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

from lgeo_jax.config import (
    Problem,
    Section,
    at_least,
    cross_check,
        field,
    greater,
    in_range,
    nonempty_distinct,
    section,
)
from lgeo_jax.sae import gemma_scope_path
from lgeo_jax.stats import MIN_NULL_DRAWS

GEMMA_SCOPE_9B_L0 = types.MappingProxyType({5: 77, 10: 113, 18: 71, 22: 123, 32: 111, 38: 128})
"""Canonical Gemma Scope 9B `width_16k/average_l0_N` folders for the paper's layers."""
_WIDTH = re.compile(r"^width_\d+[km]?$")


def _layer_l0(value: Mapping[int, int]):
    for layer, l0 in value.items():
        if layer < 0 or l0 <= 0:
            yield f".{layer}", f"expected layer >= 0 and L0 > 0, got {layer}: {l0}"


@section
class AnalysisConfig(Section):
    """Geometry against the reference dictionary of each layer, and the nulls beside every number."""

    gemma_scope_dir: str | None = field(None)  # holds layer_L/<width>/average_l0_N/params.npz
    gemma_scope_width: str = field("width_16k")  # the release's folder name
    gemma_scope_l0: Mapping[int, int] = field(GEMMA_SCOPE_9B_L0, check=_layer_l0)
    # layer -> an SAE directory in any format `lgeo_jax.sae.load_sae` reads (SAELens, sparsify, a Gemma Scope
    # params.npz folder, ours): the reference dictionary for that layer instead of Gemma Scope
    dictionary_dirs: Mapping[int, str] = field(types.MappingProxyType({}))
    max_cosine_chunk: int = field(512, check=greater(0), affects_results=False)
    subspace_k: int = field(256, check=greater(0))
    near_orthogonal_deg: float = field(70.0, check=in_range(0.0, 90.0))
    aligned_deg: float = field(30.0, check=in_range(0.0, 90.0))
    # Table 10 at several k (the paper's section 6.3); default: k/4, k/2, k, 2k. Each is capped by the sizes.
    k_sweep: tuple[int, ...] = field(derived=lambda s: tuple(sorted({max(1, s.subspace_k // 4),
                                                                      max(1, s.subspace_k // 2), s.subspace_k,
                                                                      2 * s.subspace_k})),
                                     check=nonempty_distinct(greater(0)))
    active_threshold: float = field(0.0, check=at_least(0))
    # LoRA-span linkage: directions of the adapters' stacked write matrices whose singular value is below this
    # fraction of the largest are numerical noise, not part of the span (float32 factors: ~1e-7 relative)
    span_rtol: float = field(1e-4, check=in_range(0.0, 1.0, hi_open=True))
    # Table 9's one-to-one matching and its two nulls: 1 + 2 x null_samples Hungarian assignments per seed and
    # cell; at 16,384 x 16,384 each takes ~35 s of one CPU core (bench/matching.md), ~25 min per cell
    matching: bool = field(True)
    # a latent is live (Tables 9-10) when it fires on more than this fraction of its SAE's training tokens
    live_density: float = field(1e-5, check=in_range(0.0, 1.0, hi_open=True))
    null_samples: int = field(MIN_NULL_DRAWS, check=at_least(MIN_NULL_DRAWS))  # Monte Carlo draws per null
    null_seed: int = field(0, check=at_least(0))
    n_boot: int = field(1000, check=at_least(100))  # bootstrap resamples (prompts; latents for Table 9)
    # latent resamples for Table 10's subspaces: each is a d x d eigendecomposition, so fewer than n_boot
    subspace_boot: int = field(200, check=at_least(20))
    boot_seed: int = field(0, check=at_least(0))
    confidence: float = field(0.95, check=in_range(0.5, 1.0, hi_open=True))  # central coverage of every interval
    eval_split: str = field("heldout")  # a split of extract.splits (the study checks it)

    def has_external_dictionary(self, layer: int) -> bool:
        """True when `layer`'s reference dictionary comes from outside the run (else: our base-SAE export)."""
        return layer in self.dictionary_dirs or self.gemma_scope_dir is not None

    def gemma_scope_params(self, layer: int, l0: int | None = None) -> Path:
        """Relative path of the Gemma Scope SAE of `layer` (L0 variant `l0`, default the configured one)."""
        return gemma_scope_path(layer, self.gemma_scope_width, self.gemma_scope_l0[layer] if l0 is None else l0)

    @cross_check("gemma_scope_width")
    def _width(self) -> Iterator[Problem]:
        if not _WIDTH.match(self.gemma_scope_width):
            yield Problem("gemma_scope_width", f"expected a Gemma Scope width folder like 'width_16k', got "
                                               f"{self.gemma_scope_width!r}")

    @cross_check("aligned_deg", "near_orthogonal_deg")
    def _thresholds(self) -> Iterator[Problem]:
        if self.aligned_deg >= self.near_orthogonal_deg:
            yield Problem(
                "aligned_deg",
                f"must be below near_orthogonal_deg ({self.near_orthogonal_deg:g}), got {self.aligned_deg:g}",
            )
