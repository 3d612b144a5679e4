"""Which tokens become corpus rows, and at which row each batch writes: fixed before any compute.

The plan is a pure function of the tokenized split and the extraction settings, so every host and every
resumed attempt derives the same row offsets: batch `b` always writes rows `[offsets[b], offsets[b+1])`,
which makes rewriting a batch after a crash idempotent and lets hosts write disjoint row ranges with no
coordination. Counting rows needs only the tokenized lengths, so arrays are preallocated up front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Int

from lgeo_jax.corpus._config import ExtractConfig
from lgeo_jax.data import BatchConfig, TokenizedExample, epoch_batches


@dataclasses.dataclass(frozen=True, eq=False)
class SplitPlan:
    """One split's batches and rows. `keep[i]` marks the kept positions of example `i` (its own length)."""

    split: str
    examples: tuple[TokenizedExample, ...]
    keep: tuple[Bool[np.ndarray, " T"], ...]
    batches: tuple[Int[np.ndarray, " b"], ...]  # example positions of each batch, in batch order
    offsets: Int[np.ndarray, " n+1"]  # rows of batch b: [offsets[b], offsets[b + 1])

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def batch_rows(self, b: int) -> tuple[int, int]:
        return int(self.offsets[b]), int(self.offsets[b + 1])

    def metadata(self, categories: Sequence[int]) -> dict[str, np.ndarray]:
        """Per-row sample index, position, token id and category code (`categories[i]` for example i)."""
        fields = {"sample_index": [], "position": [], "token_id": [], "category": []}
        for b in self.batches:
            for i in b:
                pos = np.flatnonzero(self.keep[i]).astype(np.int32)  # [k]
                fields["sample_index"].append(np.full(pos.shape, self.examples[i].index, np.int32))
                fields["position"].append(pos)
                fields["token_id"].append(self.examples[i].input_ids[pos].astype(np.int32))
                fields["category"].append(np.full(pos.shape, categories[i], np.int32))
        empty = np.zeros((0,), np.int32)
        return {k: np.concatenate(v) if v else empty for k, v in fields.items()}


def _keep_masks(examples: Sequence[TokenizedExample], selection: ExtractConfig, split_code: int) -> list[np.ndarray]:
    keep = []
    for e in examples:
        mask = np.ones((e.length,), bool)  # [T]
        if selection.exclude_bos:
            mask[0] = False
        keep.append(mask)
    total = sum(int(m.sum()) for m in keep)
    if selection.token_budget is None or total <= selection.token_budget:
        return keep
    # One draw over the split's kept tokens in (example, position) order; rows of base, every adapter
    # and every layer are these same tokens.
    chosen = np.zeros((total,), bool)
    rng = np.random.default_rng((selection.subsample_seed, split_code))
    chosen[rng.choice(total, size=selection.token_budget, replace=False)] = True
    start = 0
    for mask in keep:
        n = int(mask.sum())
        mask[np.flatnonzero(mask)] = chosen[start:start + n]
        start += n
    return keep


def plan_split(split: str, examples: Sequence[TokenizedExample], config: ExtractConfig,
               split_code: int = 0) -> SplitPlan:
    """Batches of `config.batch_size` (length-sorted, unshuffled: consecutive records) and row offsets for one
    split, keeping the tokens `config` selects. `split_code` separates the subsampling draws of splits."""
    examples = tuple(examples)
    if not examples:
        raise ValueError(f"split '{split}': no examples to extract")
    keep = _keep_masks(examples, config, split_code)
    batches = epoch_batches([e.length for e in examples], BatchConfig(batch_size=config.batch_size, shuffle=False), 0)
    counts = [sum(int(keep[i].sum()) for i in b) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SplitPlan(split, examples, tuple(keep), tuple(np.asarray(b) for b in batches), offsets)
