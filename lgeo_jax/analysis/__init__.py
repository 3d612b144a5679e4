"""Per-table metrics of the study (Tables 4-12) and their null baselines, built on `lgeo_jax.geometry`.

Typical use (the `analysis` stage does this per layer)::

    saes = LayerSAEs(dictionary=load_gemma_scope(path), delta={"r4": {0: sae_s0, 1: sae_s1}}, base={1: base_s1})
    record, arrays = analyze_layer(5, d_model, saes, base_batches, pair_batches, AnalysisConfig(), NullCache(...))

Definitions follow docs/conventions.md: both reconstruction errors (rel_l2 mean-of-ratios and
pooled, fvu) on the same held-out tokens for the dictionary and the delta SAEs; Table 8 overlap with
chance and shuffled-token nulls; max-cosine and principal angles next to random-direction, random-init,
seed-to-seed and base-base nulls; streaming CKA with a shuffled-token null.
"""

from lgeo_jax.analysis._config import GEMMA_SCOPE_9B_L0, AnalysisConfig
from lgeo_jax.analysis._corpus_tables import table4, table12
from lgeo_jax.analysis._dictionary import (
    Comparison,
    angle_stats,
    compare,
    count_rows,
    live_rows,
    max_cosine_stats,
    subspace,
    subspace_k,
)
from lgeo_jax.analysis._layer import LayerSAEs, NullCache, analyze_layer
from lgeo_jax.analysis._nulls import random_angles, random_init_decoder, random_max_cosine
from lgeo_jax.analysis._overlap import OverlapSums
from lgeo_jax.analysis._recon import ERROR_NAMES, ErrorSums, improvement
from lgeo_jax.analysis._tokens import DeviceSAE, FiringCounts, adapter_pass, base_pass

__all__ = [
    "ERROR_NAMES", "GEMMA_SCOPE_9B_L0", "AnalysisConfig", "Comparison", "DeviceSAE", "ErrorSums", "FiringCounts",
    "LayerSAEs",
    "NullCache", "OverlapSums", "adapter_pass", "analyze_layer", "angle_stats", "base_pass", "compare", "count_rows",
    "improvement", "live_rows", "max_cosine_stats", "random_angles", "random_init_decoder", "random_max_cosine",
    "subspace", "subspace_k", "table4", "table12",
]
