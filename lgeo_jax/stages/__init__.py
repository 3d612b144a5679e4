"""The study's stages, in pipeline order; each is `run_<stage>(config, stage, run)` (see `lgeo_jax.manifest`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lgeo_jax.manifest import PIPELINE

# Stage name -> "module:function"; imported on demand so `lgeo plan` stays light.
_STAGE_FUNCTIONS = {
    "data": "lgeo_jax.stages._data:run_data",
    "base": "lgeo_jax.stages._base:run_base",
    "adapters": "lgeo_jax.stages._adapters:run_adapters",
    "corpus": "lgeo_jax.stages._corpus:run_corpus",
    "saes": "lgeo_jax.stages._saes:run_saes",
    "analysis": "lgeo_jax.stages._analysis:run_analysis",
    "report": "lgeo_jax.stages._report:run_report",
}
STAGE_NAMES = tuple(spec.name for spec in PIPELINE)


def stage_function(name: str) -> Callable:
    module, func = _STAGE_FUNCTIONS[name].split(":")
    return getattr(importlib.import_module(module), func)


def upstream_of(name: str) -> tuple[str, ...]:
    """`name` and every stage it depends on, in pipeline order."""
    specs = {s.name: s for s in PIPELINE}
    needed, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(specs[n].inputs)
    return tuple(s for s in STAGE_NAMES if s in needed)
