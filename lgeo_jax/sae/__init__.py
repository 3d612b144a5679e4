"""Sparse autoencoders on (delta) activations: models, many-at-once training (ReLU + L1, TopK and BatchTopK
with AuxK, JumpReLU with an L0 penalty), L1 sweeps that search for their L0 target, training health, formats.

Conventions (docs/conventions.md): each SAE sees ``x / s`` with its saved RMS scale
``s = sqrt(mean_t ||x_t||^2 / d)`` (1 with ``normalize: none``); reconstructions and held-out errors are in
original units. Loss: MSE summed over d and averaged over tokens plus the architecture's term, equal to
SAELens' training loss (`lgeo_jax.sae._losses`); unit-norm decoder rows (or decoder-norm-weighted L1 as an
option for ReLU).
"""

from lgeo_jax.sae._config import Arch, BDecInit, Normalize, SAEConfig, SAETrainConfig, Sparsity
from lgeo_jax.sae._formats import (
    FORMATS,
    export_sae,
    gemma_scope_path,
    load_gemma_scope,
    load_sae,
    load_saelens,
    load_sparsify,
    save_sae,
    write_gemma_scope,
    write_saelens,
    write_sparsify,
)
from lgeo_jax.sae._health import MOVED_COS, SAEHealth, sae_health
from lgeo_jax.sae._log import MetricsCSV, plot_metrics, read_metrics
from lgeo_jax.sae._losses import auxk_loss, batch_metrics, batch_topk
from lgeo_jax.sae._memory import SAEMemory, estimate_sae_memory
from lgeo_jax.sae._models import SAE, decode, encode, forward, init_params
from lgeo_jax.sae._source import ArraySource, Batch, BatchSource, StackedSource
from lgeo_jax.sae._sweep import SweepPoint, SweepSearch, l1_sweep, next_grid, pick_l1, search_l1
from lgeo_jax.sae._train import TrainResult, check_batch, default_mesh, initial_decoder, open_job, train_saes

__all__ = [
    "FORMATS", "MOVED_COS", "SAE", "Arch", "ArraySource", "BDecInit", "Batch", "BatchSource", "MetricsCSV", "Normalize",
    "SAEConfig", "auxk_loss", "batch_metrics", "batch_topk", "check_batch", "open_job",
    "SAEHealth", "SAEMemory", "SAETrainConfig", "Sparsity", "StackedSource", "SweepPoint", "SweepSearch",
    "TrainResult", "decode", "default_mesh", "encode", "estimate_sae_memory", "export_sae", "forward",
    "gemma_scope_path",
    "init_params", "initial_decoder", "l1_sweep", "load_gemma_scope", "load_sae", "load_saelens", "load_sparsify",
    "next_grid", "pick_l1", "plot_metrics", "read_metrics", "sae_health", "save_sae", "search_l1", "train_saes",
    "write_gemma_scope", "write_saelens", "write_sparsify",
]
