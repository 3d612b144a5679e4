"""Gemma-2 in Flax NNX: config, model, HF checkpoint loading and residual capture."""

from lgeo_jax.model._checkpoint import CheckpointError, SafetensorsFile, load_model, save_model
from lgeo_jax.model._config import AttentionType, Gemma2Config
from lgeo_jax.model._layers import LoraFactors
from lgeo_jax.model._transformer import Gemma2, StackedLora, abstract_model, count_params, init_model

__all__ = [
    "AttentionType", "CheckpointError", "Gemma2", "Gemma2Config", "LoraFactors", "SafetensorsFile", "StackedLora",
    "abstract_model", "count_params", "init_model", "load_model", "save_model",
]
