"""lgeo_jax: the feature geometry of LoRA adapters, in JAX.

Public API: `load_model`, `residuals`, `load_adapter`, and the model/adapter types (conventions in
docs/conventions.md). The study's stages, config and run directories are in `lgeo_jax.stages` and
`lgeo_jax.study`; each package below owns one concept and its own config section.
"""

from lgeo_jax.lora import (
    AdapterSpec,
    LoraAdapters,
    check_layers,
    concat_adapters,
    init_adapters,
    load_adapter,
    residuals,
    save_adapter,
)
from lgeo_jax.model import (
    Gemma2,
    Gemma2Config,
    abstract_model,
    count_params,
    init_model,
    load_model,
    save_model,
)

__all__ = [
    "AdapterSpec", "Gemma2", "Gemma2Config", "LoraAdapters", "abstract_model", "check_layers", "concat_adapters",
    "count_params", "init_adapters", "init_model", "load_adapter", "load_model", "residuals", "save_adapter",
    "save_model",
]
