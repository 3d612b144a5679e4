"""`PromptSums`: per-prompt sums of named per-token quantities, streamed batch by batch, mergeable.

Tokens of one prompt are not independent, so the unit of resampling is the prompt (docs/conventions.md, "Statistics"):
the analysis keeps, for every prompt, the sums of whatever per-token quantities its statistics are built
from (err^2, ||x||^2, per-token ratios and their counts, moment sums for CKA), and `bootstrap` resamples
those rows. Each token row carries its prompt id (the corpus' `sample_index`); ids are arbitrary
non-negative integers (dataset indices), so prompts are stored as a sorted id array plus one row each.

Every sum is float64. Rows are grouped per batch with one sort and `np.add.reduceat` (vectorised over
all quantities' trailing axes), then folded into the running rows: in place when every id of the batch
is already known, else after a union of the ids. `merge` uses the same fold, so accumulators built on
several hosts or over halves of a corpus combine to exactly what one pass would give (up to float64
summation order).

The number of token rows per prompt is always kept, under the reserved name `COUNT` ("n").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

COUNT = "n"  # the reserved quantity: token rows per prompt


def _check_same(names: set[str], shapes: dict[str, tuple[int, ...]], sums: Mapping[str, np.ndarray],
                where: str) -> None:
    if set(sums) != names:
        raise ValueError(f"{where}: quantities {sorted(sums)} differ from the accumulated {sorted(names)}; every "
                         "batch must carry the same quantities (a missing one would bias every statistic using it)")
    for name, value in sums.items():
        if value.shape[1:] != shapes[name]:
            raise ValueError(f"{where}: quantity {name!r} has per-token shape {value.shape[1:]}, earlier "
                             f"{shapes[name]}")


@dataclasses.dataclass
class PromptSums:
    """Per-prompt sums: `ids` [P] sorted unique prompt ids, `sums[name]` [P, *shape] float64 (incl. `COUNT`)."""

    ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # [P]
    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, np.int64)
        self.sums = {name: np.asarray(value, np.float64) for name, value in self.sums.items()}
        if self.ids.ndim != 1 or np.any(np.diff(self.ids) <= 0):
            raise ValueError("PromptSums: ids must be a 1-d array of strictly increasing prompt ids")
        if self.sums and COUNT not in self.sums:
            raise ValueError(f"PromptSums: sums must include the token counts under {COUNT!r}")
        for name, value in self.sums.items():
            if value.shape[:1] != self.ids.shape:
                raise ValueError(f"PromptSums: sums[{name!r}] has {value.shape[:1]} leading rows for "
                                 f"{self.ids.size} ids")

    @property
    def n_prompts(self) -> int:
        return int(self.ids.size)

    @property
    def names(self) -> tuple[str, ...]:
        """The user quantities (everything but `COUNT`), sorted."""
        return tuple(sorted(name for name in self.sums if name != COUNT))

    def add(self, sample_index: np.ndarray, quantities: Mapping[str, np.ndarray]) -> PromptSums:
        """Adds a batch of token rows: `quantities[name]` [B, ...] summed into the row of `sample_index` [B].

        Every batch must carry the same names with the same per-token shapes. Returns self.
        """
        sample_index = np.asarray(sample_index)
        if sample_index.ndim != 1 or not np.issubdtype(sample_index.dtype, np.integer):
            raise ValueError(f"PromptSums.add: sample_index must be a 1-d integer array, got {sample_index.dtype} "
                             f"{sample_index.shape}")
        if COUNT in quantities:
            raise ValueError(f"PromptSums.add: {COUNT!r} is reserved for the token counts, which are kept anyway")
        if not quantities:
            raise ValueError("PromptSums.add: no quantities given")
        values = {name: np.asarray(value, np.float64) for name, value in quantities.items()}
        for name, value in values.items():
            if value.shape[:1] != sample_index.shape:
                raise ValueError(f"PromptSums.add: quantity {name!r} has {value.shape[:1]} leading rows for "
                                 f"{sample_index.size} sample_index rows")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"PromptSums.add: quantity {name!r} has non-finite values; one would make its "
                                 "prompt's sum, and every resample drawing that prompt, non-finite")
        if sample_index.size == 0:
            return self
        if sample_index.min() < 0:
            raise ValueError("PromptSums.add: negative sample_index; drop filler rows (sample_index -1) first")
        ids, inverse, counts = np.unique(sample_index, return_inverse=True, return_counts=True)  # [K], [B], [K]
        order = np.argsort(inverse, kind="stable")  # [B]: rows grouped by prompt
        starts = np.cumsum(counts) - counts  # [K]: each group's first row in `order`
        sums = {name: np.add.reduceat(value[order], starts, axis=0) for name, value in values.items()}  # [K, ...]
        sums[COUNT] = counts.astype(np.float64)
        return self._fold(ids.astype(np.int64), sums, "PromptSums.add")

    def merge(self, other: PromptSums) -> PromptSums:
        """Folds `other` (another host's or another part of the corpus' accumulator) into self; returns self."""
        if not other.sums:
            return self
        return self._fold(other.ids, other.sums, "PromptSums.merge")

    def totals(self) -> dict[str, np.ndarray]:
        """Sums over all prompts, name -> [*shape] (what the point estimate of a statistic is computed from)."""
        return {name: value.sum(axis=0) for name, value in self.sums.items()}

    def _fold(self, ids: np.ndarray, sums: Mapping[str, np.ndarray], where: str) -> PromptSums:
        """Adds rows `sums[name]` [K, ...] of sorted unique `ids` [K] into the running rows."""
        if not self.sums:
            self.ids = ids.copy()
            self.sums = {name: value.copy() for name, value in sums.items()}
            return self
        _check_same(set(self.sums), {name: value.shape[1:] for name, value in self.sums.items()}, sums, where)
        pos = np.searchsorted(self.ids, ids)  # [K]
        known = (pos < self.ids.size) & (self.ids[np.minimum(pos, self.ids.size - 1)] == ids)  # [K]
        if not known.all():
            union = np.union1d(self.ids, ids)  # [P']
            old = np.searchsorted(union, self.ids)  # [P]
            grown = {}
            for name, value in self.sums.items():
                grown[name] = np.zeros((union.size, *value.shape[1:]))  # [P', ...]
                grown[name][old] = value
            self.ids, self.sums = union, grown
            pos = np.searchsorted(self.ids, ids)
        for name, value in sums.items():
            self.sums[name][pos] += value  # `pos` has no repeats (ids are unique), so fancy += is exact
        return self
