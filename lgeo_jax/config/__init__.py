"""Study configuration: YAML -> validated frozen dataclasses, overrides, section hashes, YAML dump.

Typical use::

    config = load_config("configs/tiny.yaml", ["sae.l1=0.1"])   # raises ConfigError listing every problem
    stage_hash = section_hash(config, "sae")
    print(dump_config(config))
"""

from lgeo_jax.config._errors import ConfigError, Problem
from lgeo_jax.config._hash import canonical_json, section_hash, section_hashes
from lgeo_jax.config._load import (
    apply_overrides,
    config_from_dict,
    config_from_yaml,
    dump_config,
    load_config,
    to_dict,
)
from lgeo_jax.config._paths import path_problems
from lgeo_jax.config._sections import (
    ALPACA_HUB_ID,
    BUILTIN_DATA,
    BUILTIN_MODEL,
    GEMMA_SCOPE_9B_L0,
    SECTION_NAMES,
    SPLIT_NAMES,
    AnalysisConfig,
    BuiltinModelConfig,
    DataConfig,
    DType,
    ExtractConfig,
    LoraConfig,
    LossOn,
    ModelConfig,
    Overflow,
    PlotFormat,
    ReportConfig,
    SaeArchitecture,
    SaeConfig,
    SaeNormalize,
    Schedule,
    StudyConfig,
    TrainConfig,
    is_placeholder,
)

__all__ = [
    "ALPACA_HUB_ID",
    "BUILTIN_DATA",
    "BUILTIN_MODEL",
    "GEMMA_SCOPE_9B_L0",
    "SECTION_NAMES",
    "SPLIT_NAMES",
    "AnalysisConfig",
    "BuiltinModelConfig",
    "ConfigError",
    "DType",
    "DataConfig",
    "ExtractConfig",
    "LoraConfig",
    "LossOn",
    "ModelConfig",
    "Overflow",
    "PlotFormat",
    "Problem",
    "ReportConfig",
    "SaeArchitecture",
    "SaeConfig",
    "SaeNormalize",
    "Schedule",
    "StudyConfig",
    "TrainConfig",
    "apply_overrides",
    "canonical_json",
    "config_from_dict",
    "config_from_yaml",
    "dump_config",
    "is_placeholder",
    "load_config",
    "path_problems",
    "section_hash",
    "section_hashes",
    "to_dict",
]
