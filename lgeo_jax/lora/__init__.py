"""Functional multi-adapter LoRA over the Gemma-2 model: the base and every adapter's residual streams from one
jitted pass (`residuals`), splice evaluation (`splice`: the adapted model continued from a replaced residual), the
`lora` config section, and PEFT import/export."""

from lgeo_jax.lora._adapters import (
    DEFAULT_TARGETS,
    PEFT_NAMES,
    TARGETS,
    AdapterSpec,
    LoraAdapters,
    concat_adapters,
    factor_axes,
    init_adapters,
    pad_layers,
    prepare_adapters,
    stacked_lora,
    target_dims,
)
from lgeo_jax.lora._config import LoraConfig
from lgeo_jax.lora._peft import load_adapter, save_adapter
from lgeo_jax.lora._residuals import CPU_FUSION_TOKENS, batch_shards, check_layers, micro_batch_size, residuals
from lgeo_jax.lora._splice import Splice, SpliceInput, SpliceTokens, splice
from lgeo_jax.lora._tune import AUTO, candidate_micro_batches, fastest_micro_batch, tune_micro_batch_tokens

__all__ = [
    "AUTO", "AdapterSpec", "CPU_FUSION_TOKENS", "DEFAULT_TARGETS", "LoraAdapters", "LoraConfig", "PEFT_NAMES", "Splice",
    "SpliceInput", "SpliceTokens", "TARGETS",
    "batch_shards", "candidate_micro_batches", "check_layers", "concat_adapters", "factor_axes", "fastest_micro_batch",
    "init_adapters", "load_adapter", "micro_batch_size", "pad_layers", "prepare_adapters", "residuals", "save_adapter",
    "splice", "stacked_lora", "target_dims", "tune_micro_batch_tokens",
]
