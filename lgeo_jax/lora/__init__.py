"""Functional multi-adapter LoRA over the Gemma-2 model, and PEFT import/export."""

from lgeo_jax.lora._adapters import (
    DEFAULT_TARGETS,
    PEFT_NAMES,
    TARGETS,
    AdapterSpec,
    LoraAdapters,
    concat_adapters,
    init_adapters,
    pad_layers,
    prepare_adapters,
    stacked_lora,
    target_dims,
)
from lgeo_jax.lora._peft import load_adapter, save_adapter

__all__ = [
    "DEFAULT_TARGETS", "PEFT_NAMES", "TARGETS", "AdapterSpec", "LoraAdapters", "concat_adapters", "init_adapters",
    "load_adapter", "pad_layers", "prepare_adapters", "save_adapter", "stacked_lora", "target_dims",
]
