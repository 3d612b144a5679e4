"""The configuration layer: YAML -> validated frozen dataclasses, with every problem reported at once.

Each package declares its own settings as a `Section` (`@section` + `field(...)` with checks) and the
study config (`lgeo_jax.study.StudyConfig`) only nests them, so every setting has one schema: one type,
one default, one check. This package imports nothing else from lgeo_jax but `lgeo_jax.files`.

Typical use::

    @section
    class SweepConfig(Section):
        l1: tuple[float, ...] = field((0.1,), check=each(greater(0)))

    config = load_yaml(SweepConfig, "sweep.yaml", ["l1=[0.1,0.2]"])   # raises ConfigError listing every problem
"""

from lgeo_jax.config._common import PLACEHOLDER_PREFIX, DType, is_placeholder, section_hash
from lgeo_jax.config._convert import (
    REQUIRED,
    Section,
    at_least,
    cross_check,
    default_of,
    each,
    field,
    greater,
    in_range,
    nonempty_distinct,
    one_of,
    section,
    split_range,
    to_plain,
)
from lgeo_jax.config._errors import ConfigError, Problem
from lgeo_jax.config._yaml import apply_overrides, dump_yaml, from_dict, from_yaml, load_yaml

__all__ = [
    "PLACEHOLDER_PREFIX", "REQUIRED", "ConfigError", "DType", "Problem", "Section", "apply_overrides", "at_least",
    "cross_check", "default_of", "dump_yaml", "each", "field", "from_dict", "from_yaml", "greater", "in_range",
    "is_placeholder", "load_yaml", "nonempty_distinct", "one_of", "section", "section_hash", "split_range",
    "to_plain",
]
