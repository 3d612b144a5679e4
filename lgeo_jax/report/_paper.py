"""The paper's reported numbers (arXiv 2605.28896, Tables 2 and 4-12), transcribed as data.

Gemma-2-9B, Gemma Scope width_16k, LoRA ranks 4/8/16/32, layers 5/10/18/22/32/38. Grid tables map
layer -> rank -> value. Cells the paper does not report are absent (never zero). The report puts these
beside our numbers; nothing here is used to compute anything.
"""

from __future__ import annotations

PAPER_RANKS = (4, 8, 16, 32)
PAPER_LAYERS = (5, 10, 18, 22, 32, 38)


def _grid(rows: dict[int, tuple[float, ...]]) -> dict[int, dict[int, float]]:
    return {layer: dict(zip(PAPER_RANKS, values, strict=True)) for layer, values in rows.items()}


TABLE2_ADAPTERS = {  # rank -> trainable parameters, % of the 9.24B total, final training loss
    4: {"trainable_params": 4_472_832, "pct_of_total": 0.048, "final_train_loss": 1.1272},
    8: {"trainable_params": 8_945_664, "pct_of_total": 0.097, "final_train_loss": 1.0953},
    16: {"trainable_params": 17_891_328, "pct_of_total": 0.193, "final_train_loss": 1.0494},
    32: {"trainable_params": 35_782_656, "pct_of_total": 0.387, "final_train_loss": 0.9914},
}
"""Table 2: LoRA adapters (trainable parameters = r x 26,624 x 42 layers)."""

TABLE4_MEAN_DELTA_NORM = _grid({
    5: (18.13, 20.13, 19.29, 22.25),
    10: (34.61, 38.45, 38.52, 39.79),
    18: (61.31, 66.51, 65.90, 73.86),
    22: (80.70, 84.36, 86.83, 93.49),
    32: (188.29, 195.07, 186.03, 193.42),
    38: (321.07, 345.45, 320.67, 330.81),
})
"""Table 4: mean ||delta||."""

TABLE5_GEMMA_SCOPE_ERROR = _grid({
    5: (2.457, 2.262, 2.376, 2.150),
    10: (1.568, 1.460, 1.484, 1.483),
    18: (1.283, 1.237, 1.268, 1.232),
    22: (1.178, 1.159, 1.150, 1.134),
    32: (1.260, 1.299, 1.396, 1.492),
    38: (1.137, 1.131, 1.165, 1.217),
})
"""Table 5: Gemma Scope relative reconstruction error on delta."""

TABLE6_DELTA_SAE_ERROR = _grid({
    5: (0.340, 0.340, 0.358, 0.350),
    10: (0.445, 0.443, 0.460, 0.463),
    18: (0.386, 0.395, 0.414, 0.410),
    22: (0.386, 0.399, 0.419, 0.437),
    32: (0.569, 0.553, 0.580, 0.603),
    38: (0.611, 0.606, 0.620, 0.652),
})
"""Table 6: delta-SAE held-out reconstruction error."""

TABLE7_IMPROVEMENT_PCT = _grid({
    5: (86.2, 85.0, 85.0, 83.7),
    10: (71.6, 69.6, 69.0, 68.8),
    18: (69.9, 68.1, 67.4, 66.8),
    22: (67.2, 65.5, 63.6, 61.5),
    32: (54.9, 57.5, 58.5, 59.6),
    38: (46.3, 46.4, 46.8, 46.4),
})
"""Table 7: improvement % = 1 - Table 6 / Table 5."""

TABLE8_OVERLAP = _grid({
    5: (0.0037, 0.0032, 0.0034, 0.0037),
    18: (0.0256, 0.0345, 0.0249, 0.0198),
    38: (0.0628, 0.0557, 0.0490, 0.0409),
})
"""Table 8: fraction of Gemma Scope features active on delta that are also active on h_base."""

TABLE8_ACTIVE_FEATURES = _grid({
    5: (10.08, 10.72, 11.30, 11.91),
    18: (13.84, 10.63, 16.77, 16.50),
    38: (30.28, 33.65, 34.95, 41.66),
})
"""Table 8: Gemma Scope features active on delta per token."""

TABLE9_MAX_COSINE: dict[tuple[int, int], dict[str, float]] = {
    (4, 5): {"mean": 0.0706, "median": 0.0659, "pct_below": 99.77, "pct_above": 0.02},
    (4, 22): {"mean": 0.0714, "median": 0.0671, "pct_below": 99.41, "pct_above": 0.02},
    (4, 38): {"mean": 0.0709, "median": 0.0663, "pct_below": 99.55, "pct_above": 0.01},
    (8, 5): {"mean": 0.0701},
    (16, 5): {"mean": 0.0703},
    (32, 5): {"mean": 0.0707},
    (32, 38): {"mean": 0.0711},
}
"""Table 9: max cosine of delta-SAE decoder rows vs Gemma Scope, keyed (rank, layer)."""

TABLE9_CLAIMED_RANDOM = 0.000
"""The paper's stated random baseline for Table 9 (wrong: ~0.067 for 16,384 directions in R^3584)."""

TABLE10_SUMMARY = {
    "mean_min": 72.4,
    "mean_max": 75.0,
    "mean_overall": 73.72,
    "pct_near_orthogonal": 66.3,
    "pct_aligned": 0.0,
}
"""Table 10: principal angles of top-256 subspaces (degrees; per-cell means span 72.4-75.0). The paper's per-cell
values are not transcribed (docs/paper.md gives this summary only), so none is shown per cell."""

TABLE11_CKA_DELTA_BASE = _grid({
    5: (0.353, 0.362, 0.304, 0.328),
    18: (0.080, 0.053, 0.050, 0.052),
    22: (0.194, 0.136, 0.124, 0.093),
    32: (0.547, 0.576, 0.569, 0.568),
    38: (0.670, 0.693, 0.668, 0.676),
})
"""Table 11: CKA(delta, h_base)."""

TABLE11_CKA_BASE_ADAPTED = _grid({
    5: (0.999, 0.998, 0.998, 0.998),
    18: (0.987, 0.977, 0.979, 0.960),
    22: (0.983, 0.973, 0.974, 0.955),
    32: (0.971, 0.970, 0.973, 0.973),
    38: (0.938, 0.935, 0.945, 0.950),
})
"""Table 11: CKA(h_base, h_adapted)."""

TABLE12_SWEEP = (
    {"l1": 0.08, "l0": 42.9, "selected": False},
    {"l1": 0.12, "l0": 53.2, "selected": False},
    {"l1": 0.15, "l0": 31.4, "selected": True},
)
"""Table 12: L1 sweep at layer 5, rank 4 (post-normalisation coefficients)."""

TABLE12_PRE_NORM_L0 = (7941.0, 2957.0, 7.5)
"""Table 12: L0 with pre-normalisation coefficients (too dense, too dense, too sparse)."""
