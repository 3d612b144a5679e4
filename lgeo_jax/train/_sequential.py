"""One adapter at a time: the reference the stacked trainer is measured and tested against."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from lgeo_jax.data import TokenizedExample
from lgeo_jax.lora import LoraAdapters, concat_adapters
from lgeo_jax.model import Gemma2
from lgeo_jax.train._config import TrainConfig
from lgeo_jax.train._lora_trainer import TrainResult, train_lora


def split_adapters(stack: LoraAdapters) -> list[LoraAdapters]:
    """Each adapter of a stack as its own one-adapter stack, its rank padding trimmed to its own rank."""
    out = []
    for i, spec in enumerate(stack.specs):
        factors = {}
        for t in stack.targets:
            a, b, scale = stack.factors(t)
            r = spec.max_rank
            factors[t] = (jnp.asarray(a[:, i:i + 1, :, :r]), jnp.asarray(b[:, i:i + 1, :r, :]),
                          jnp.asarray(scale[:, i:i + 1]))
        out.append(LoraAdapters([spec], factors))
    return out


def train_sequential(model: Gemma2, stack: LoraAdapters, examples: Sequence[TokenizedExample],
                     train: TrainConfig, *, progress: bool = True) -> tuple[LoraAdapters, list[TrainResult]]:
    """Trains the stack's adapters one after another; returns them re-stacked (ranks re-padded)."""
    results = [train_lora(model, one, examples, train, progress=progress, desc=one.specs[0].name)
               for one in split_adapters(stack)]
    return concat_adapters([r.adapters for r in results]), results
