"""Gemma-2 in Flax NNX: config, model, HF checkpoint loading and saving."""

from lgeo_jax.model._checkpoint import CheckpointError, check_checkpoint, load_model, save_model
from lgeo_jax.model._config import (
    BUILTIN_MODEL,
    AttentionType,
    BuiltinModelConfig,
    Gemma2Config,
    ModelConfig,
    alternating_layer_types,
)
from lgeo_jax.model._layers import PROJECTIONS, LoraFactors, Projection
from lgeo_jax.model._transformer import Gemma2, StackedLora, abstract_model, count_params, init_model

__all__ = [
    "BUILTIN_MODEL", "PROJECTIONS", "AttentionType", "BuiltinModelConfig", "CheckpointError", "Gemma2", "Gemma2Config",
    "LoraFactors", "ModelConfig", "Projection", "StackedLora",
    "abstract_model", "alternating_layer_types", "check_checkpoint", "count_params", "init_model", "load_model",
    "save_model",
]
