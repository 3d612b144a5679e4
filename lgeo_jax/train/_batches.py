"""Training batches: the batching policy, input validation, and micro-batches stacked for accumulation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lgeo_jax.data import Batch, BatchConfig, TokenizedExample
from lgeo_jax.model import Gemma2Config

TOKEN_FIELDS = ("input_ids", "attention_mask", "loss_mask")  # the arrays of a `Batch` that a step reads


def check_examples(examples: Sequence[TokenizedExample], cfg: Gemma2Config, *, what: str) -> None:
    """Fails before any compute on inputs the model cannot train on, naming the example and what to do."""
    if len(examples) == 0:
        raise ValueError(f"{what}: no examples (empty dataset or split); check data.train / the records file")
    longest = max(examples, key=lambda e: e.length)
    if longest.length > cfg.max_position_embeddings:
        raise ValueError(f"{what}: example {longest.index} has {longest.length} tokens but the model supports "
                         f"max_position_embeddings={cfg.max_position_embeddings}; lower data.max_length")
    bad = [e.index for e in examples if e.input_ids.size and int(e.input_ids.max()) >= cfg.vocab_size]
    if bad:
        raise ValueError(f"{what}: example {bad[0]} has token ids >= the model's vocab_size {cfg.vocab_size}; "
                         "the tokenizer does not belong to this model")
    if sum(int(e.loss_mask.sum()) for e in examples) == 0:
        raise ValueError(f"{what}: no example has a target token (loss_mask is all 0); check data.loss_on and "
                         "data.max_length (truncation may cut every response)")


def batch_config(examples: Sequence[TokenizedExample], batch_size: int, seed: int, *,
                 shuffle: bool = True, n_buckets: int = 2) -> BatchConfig:
    """`n_buckets` length buckets up to the longest example: a run compiles its step at most that often.

    Compiling the gradient of the model costs seconds to tens of seconds on CPU, more than the padding
    that few buckets add to a small model's steps; a large model may want more buckets.
    """
    longest = max(e.length for e in examples)
    boundaries = sorted({8 * math.ceil(longest * k / n_buckets / 8) for k in range(1, n_buckets + 1)})
    return BatchConfig(batch_size=batch_size, seed=seed, shuffle=shuffle, bucket_boundaries=tuple(boundaries))


def stack_micro(batches: Sequence[Batch]) -> dict[str, np.ndarray]:
    """K micro-batches -> arrays [K, B, T] right-padded to the longest (padding is masked, so exact)."""
    width = max(b.input_ids.shape[1] for b in batches)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
    return {name: np.stack([pad(getattr(b, name)) for b in batches])
            for name in TOKEN_FIELDS}
