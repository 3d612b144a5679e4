"""Functional multi-adapter LoRA over the Gemma-2 model: the base and every adapter's residual streams from one
jitted pass (`residuals`), the `lora` config section, and PEFT import/export."""

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

__all__ = [
    "AdapterSpec", "CPU_FUSION_TOKENS", "DEFAULT_TARGETS", "LoraAdapters", "LoraConfig", "PEFT_NAMES", "TARGETS",
    "batch_shards", "check_layers", "concat_adapters", "factor_axes", "init_adapters", "load_adapter",
    "micro_batch_size", "pad_layers", "prepare_adapters", "residuals", "save_adapter", "stacked_lora", "target_dims",
]
