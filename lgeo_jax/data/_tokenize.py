"""Records -> token ids with an explicit BOS/EOS policy and a loss mask.

Prompt and response are tokenised *separately* and concatenated, ``[BOS] prompt response [EOS]``, so
the prompt/response boundary in the loss mask is exact (the official Alpaca script tokenises
``prompt + response`` and masks as many tokens as the prompt alone has, which can be off by one where a
merge crosses the boundary). Special tokens are never added by the tokenizer itself
(``add_special_tokens=False``): tokenizers loaded from a bare ``tokenizer.model`` directory do not add
BOS while checkpoint tokenizers do, and the model must see the same sequence either way.

Loss-mask convention: ``loss_mask[t] == 1`` means token ``t`` is a prediction target (predicted from
tokens ``< t``); the trainer shifts. Position 0 is never a target. ``labels`` in the Hugging Face
convention are ``where(loss_mask, input_ids, -100)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int

from lgeo_jax.data._config import DataConfig, LossOn, Overflow, select_split
from lgeo_jax.data._records import AlpacaRecord, format_prompt

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExample:
    """One tokenised record; ``index`` is its position in the loaded dataset."""

    input_ids: Int[np.ndarray, " T"]  # int32
    loss_mask: Int[np.ndarray, " T"]  # int32, 1 = target token
    index: int
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def _special_id(tokenizer, name: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise ValueError(
            f"the tokenizer has no {name} token; set data.add_{name}: false or use a tokenizer "
            f"that defines {name}_token"
        )
    return int(token_id)


def tokenize_records(
    records: Sequence[AlpacaRecord],
    tokenizer,
    config: DataConfig,
    indices: Sequence[int] | None = None,
) -> list[TokenizedExample]:
    """Tokenise ``records`` with a transformers tokenizer (batch encoding of prompts and responses).

    ``indices`` are the records' dataset indices (default ``0..len-1``); they travel with every example
    into the batches so outputs can be traced back to records.
    """
    if not records:
        raise ValueError("tokenize_records: no records to tokenise (empty dataset or split)")
    indices = list(range(len(records))) if indices is None else list(indices)
    if len(indices) != len(records):
        raise ValueError(f"tokenize_records: {len(indices)} indices for {len(records)} records")
    prefix = [_special_id(tokenizer, "bos")] if config.add_bos else []
    suffix = [_special_id(tokenizer, "eos")] if config.add_eos else []
    prompts = tokenizer([format_prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]

    examples = []
    for index, prompt, response in zip(indices, prompts, responses, strict=True):
        head = prefix + list(prompt)
        tail = list(response) + suffix
        ids = np.asarray(head + tail, dtype=np.int32)  # [T]
        loss_mask = np.zeros(ids.shape, dtype=np.int32)  # [T]
        loss_mask[len(head) if config.loss_on is LossOn.RESPONSE else 1 :] = 1
        truncated = ids.shape[0] > config.max_length
        if truncated and config.overflow is Overflow.ERROR:
            raise ValueError(
                f"record {index}: {ids.shape[0]} tokens ({len(head)} prompt, {len(tail)} response) exceed "
                f"data.max_length={config.max_length}; raise max_length or use overflow='truncate'"
            )
        examples.append(TokenizedExample(ids[: config.max_length], loss_mask[: config.max_length], index, truncated))
    return examples


def tokenize_split(
    records: Sequence[AlpacaRecord],
    tokenizer,
    config: DataConfig,
    name: str,
) -> list[TokenizedExample]:
    """Tokenise split ``name`` of the full record list, keeping each example's dataset index."""
    return tokenize_records(select_split(records, config, name), tokenizer, config, config.indices(name))


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Token-length summary of a set of sequences."""

    count: int
    mean: float
    median: float
    p99: float
    max: int


def length_stats(lengths: Sequence[int]) -> LengthStats:
    """Mean / median / 99th percentile (linear interpolation, numpy's default) / max of ``lengths``."""
    values = np.asarray(lengths, dtype=np.float64)
    if values.size == 0:
        raise ValueError("length_stats: no lengths given")
    return LengthStats(
        count=int(values.size),
        mean=float(values.mean()),
        median=float(np.median(values)),
        p99=float(np.percentile(values, 99)),
        max=int(values.max()),
    )
