"""Per-table metrics of the study (Tables 4-12) with their intervals and null baselines, built on
`lgeo_jax.geometry` and `lgeo_jax.stats`.

Typical use (the `analysis` stage does this per layer)::

    saes = LayerSAEs(dictionary=load_gemma_scope(path), delta={"r4": {0: sae_s0, 1: sae_s1}}, base={1: base_s1})
    firing = firing_counts(training_batches, {firing_key("r4", 0): DeviceSAE(sae_s0), ...})
    record, arrays = analyze_layer(5, saes, h_base, sample_index, delta_of, firing, AnalysisConfig(),
                                   NullCache(20, 0, near_orthogonal=70, aligned=30))

Definitions follow docs/conventions.md: both reconstruction errors (rel_l2 mean-of-ratios and pooled, fvu)
on the same held-out tokens for the dictionary, its zero-input and mean-delta baselines and the delta
SAEs; Table 8 with and without latents that fire on a zero input, beside chance and shuffled-token nulls;
max-cosine, mutual nearest neighbours, one-to-one (Hungarian) matching and principal angles (at several k)
beside random-direction, random-init, seed-to-seed and base-base comparisons; CKA with a whole-split shuffled
null; the LoRA-weight linkage (`lora_span`: δ against the subspace the adapter's o_proj / down_proj factors can
write into, beside random subspaces of the same dimension). Every number
is `{"value", "ci_low", "ci_high"}` (prompt bootstrap for Tables 4-8 and 11, latents and seeds for 9-10),
headline numbers of Tables 9-11 with a `vs_null` verdict.
"""

from lgeo_jax.analysis._cka import PromptCKA, PromptGrid
from lgeo_jax.analysis._config import GEMMA_SCOPE_9B_L0, AnalysisConfig
from lgeo_jax.analysis._corpus_tables import table2, table4, table12
from lgeo_jax.analysis._crosscoder import (
    CLASSES,
    analyze_crosscoder,
    closed_form_beta,
    compare_adapter_only,
    decoder_cosine,
    latent_classes,
    latent_scaling,
    live_sae_rows,
    norm_diff,
    random_init_decoders,
)
from lgeo_jax.analysis._density import density_trends
from lgeo_jax.analysis._dictionary import (
    ANGLE_STATS,
    ROW_STATS,
    Comparison,
    angle_stats,
    compare,
    count_rows,
    live_rows,
    matched_cosine,
    row_stats,
    spectrum,
    subspace,
    subspace_k,
    subspace_resamples,
)
from lgeo_jax.analysis._layer import CKA_PAIRS, LayerSAEs, analyze_layer, firing_key, measure
from lgeo_jax.analysis._lora_span import WRITE_TARGETS, LoraSpan, lora_span, span_record, write_matrices
from lgeo_jax.analysis._nulls import NullCache, random_init_decoder
from lgeo_jax.analysis._prompt_tables import (
    ERROR_NAMES,
    adapter_intervals,
    adapter_metrics,
    improvement,
    named_bootstrap,
)
from lgeo_jax.analysis._splice import SPLICES, SpliceConfig, splice_metrics, splice_record, splice_sums, splices_for
from lgeo_jax.analysis._tokens import RECONS, DeviceSAE, FiringCounts, adapter_pass, base_pass, firing_counts

__all__ = [
    "SPLICES", "SpliceConfig", "splice_metrics", "splice_record", "splice_sums", "splices_for",
    "ANGLE_STATS", "CKA_PAIRS", "CLASSES", "analyze_crosscoder", "closed_form_beta", "compare_adapter_only",
    "decoder_cosine", "latent_classes", "latent_scaling", "live_sae_rows", "norm_diff", "random_init_decoders",
    "ERROR_NAMES", "GEMMA_SCOPE_9B_L0", "RECONS", "ROW_STATS", "AnalysisConfig",
    "Comparison", "DeviceSAE", "FiringCounts", "LayerSAEs", "NullCache", "PromptCKA", "PromptGrid",
    "adapter_intervals", "adapter_metrics", "adapter_pass", "analyze_layer", "angle_stats", "base_pass", "compare",
    "count_rows", "density_trends", "firing_counts", "firing_key", "improvement", "live_rows", "LoraSpan",
    "lora_span", "matched_cosine", "measure", "named_bootstrap", "span_record", "WRITE_TARGETS", "write_matrices",
    "random_init_decoder", "row_stats", "spectrum", "subspace", "subspace_k", "subspace_resamples",
    "table2", "table4", "table12",
]
