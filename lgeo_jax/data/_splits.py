"""Index splits of the record list (train / probe / held-out), as half-open ``[start, stop)`` ranges.

The paper trains on indices 0-9,999, probes on 5,000-6,999 and holds out 11,000-11,199. Its probe set
lies *inside* the training range, so probe activations come from examples the adapters were trained on;
we keep that default for parity and expose :attr:`SplitConfig.probe_overlaps_train` so reports can flag
it. A disjoint probe range (e.g. ``(10_000, 12_000)`` with held-out moved) is one field away.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
SPLIT_NAMES = ("train", "probe", "heldout")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Half-open index ranges into the loaded record list."""

    train: tuple[int, int] = (0, 10_000)
    probe: tuple[int, int] = (5_000, 7_000)
    heldout: tuple[int, int] = (11_000, 11_200)

    def __post_init__(self):
        for name in SPLIT_NAMES:
            bounds = tuple(int(x) for x in getattr(self, name))  # YAML gives lists
            if len(bounds) != 2:
                raise ValueError(f"SplitConfig.{name}={getattr(self, name)}: need (start, stop)")
            object.__setattr__(self, name, bounds)
            start, stop = bounds
            if not 0 <= start < stop:
                raise ValueError(f"SplitConfig.{name}={(start, stop)}: need 0 <= start < stop")
        if _overlap(self.heldout, self.train):
            raise ValueError(
                f"SplitConfig.heldout={self.heldout} overlaps train={self.train}; "
                "held-out examples must never be trained on"
            )

    @property
    def probe_overlaps_train(self) -> bool:
        """True when probe examples were also training examples (the paper's setup)."""
        return _overlap(self.probe, self.train)

    @property
    def required_records(self) -> int:
        """Smallest dataset size that holds every split."""
        return max(getattr(self, name)[1] for name in SPLIT_NAMES)

    def indices(self, name: str) -> range:
        """The record indices of split ``name``."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split '{name}'; expected one of {SPLIT_NAMES}")
        return range(*getattr(self, name))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def select_split(records: Sequence[T], config: SplitConfig, name: str) -> list[T]:
    """The records of split ``name``; raises if the dataset is empty or too small for the range."""
    indices = config.indices(name)
    if not records:
        raise ValueError(f"split '{name}': the dataset is empty")
    if indices.stop > len(records):
        raise ValueError(
            f"split '{name}' needs indices {indices.start}..{indices.stop - 1} but the dataset has only "
            f"{len(records)} records; load more data or shrink SplitConfig.{name}"
        )
    return [records[i] for i in indices]
