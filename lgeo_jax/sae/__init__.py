"""Sparse autoencoders on (delta) activations: models, many-at-once training, L1 sweeps, formats.

Conventions (docs/conventions.md): each SAE sees ``x / s`` with its saved RMS scale
``s = sqrt(mean_t ||x_t||^2 / d)`` (1 with ``normalize: none``); reconstructions and held-out errors are in
original units. Loss:
MSE summed over d and averaged over tokens, plus L1 on activations with unit-norm decoder rows (or
decoder-norm-weighted L1 as an option); see `lgeo_jax.sae._step`.
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
from lgeo_jax.sae._log import plot_metrics, read_metrics
from lgeo_jax.sae._memory import SAEMemory, estimate_sae_memory
from lgeo_jax.sae._models import SAE, decode, encode, init_params
from lgeo_jax.sae._source import ArraySource, Batch, BatchSource
from lgeo_jax.sae._sweep import SweepPoint, l1_sweep, pick_l1
from lgeo_jax.sae._train import TrainResult, default_mesh, train_saes

__all__ = [
    "FORMATS", "SAE", "Arch", "ArraySource", "BDecInit", "Batch", "BatchSource", "Normalize", "SAEConfig", "SAEMemory",
    "SAETrainConfig", "Sparsity", "SweepPoint", "TrainResult", "decode", "default_mesh", "encode",
    "estimate_sae_memory", "export_sae", "gemma_scope_path", "init_params", "l1_sweep", "load_gemma_scope",
    "load_sae", "load_saelens", "load_sparsify", "pick_l1", "plot_metrics", "read_metrics", "save_sae",
    "train_saes", "write_gemma_scope", "write_saelens", "write_sparsify",
]
