"""The `analysis` section: the reference dictionary (Gemma Scope or any SAE directory), geometry
thresholds and null baselines."""

from __future__ import annotations

import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

from lgeo_jax.config import Problem, Section, at_least, cross_check, field, greater, in_range, section
from lgeo_jax.sae import gemma_scope_path

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
    active_threshold: float = field(0.0, check=at_least(0))
    null_samples: int = field(8, check=greater(0))
    null_seed: int = field(0, check=at_least(0))
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
