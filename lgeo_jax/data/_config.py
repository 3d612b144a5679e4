"""The `data` section: where records come from, how they are split and how they become tokens.

Splits are half-open index ranges ``[start, stop)`` into the loaded record list. The paper trains on
indices 0-9,999, probes on 5,000-6,999 and holds out 11,000-11,199. Its probe set lies *inside* the
training range, so probe activations come from examples the adapters were trained on; we keep that
default for parity and expose :attr:`DataConfig.probe_overlaps_train` so reports can flag it. A disjoint
probe range (e.g. ``[10000, 12000]`` with held-out moved) is one field away.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Sequence
from typing import TypeVar

from lgeo_jax.config import Problem, Section, at_least, cross_check, field, greater, section, split_range
from lgeo_jax.data._alpaca import ALPACA_HUB_ID

T = TypeVar("T")
SPLIT_NAMES = ("train", "probe", "heldout")
BUILTIN_DATA = "builtin:synthetic"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LossOn(enum.Enum):
    RESPONSE = "response"  # response tokens and EOS (the Alpaca recipe)
    ALL = "all"  # every token after the first


class Overflow(enum.Enum):
    TRUNCATE = "truncate"  # cut from the right, as the Alpaca recipe's ``truncation=True``
    ERROR = "error"


@section
class DataConfig(Section):
    """Records, splits and tokenisation; ``max_length`` counts BOS and EOS."""

    source: str = field(ALPACA_HUB_ID)  # hub id, a local .json/.jsonl path, or builtin:synthetic
    sha256: str | None = field(None)  # verify a local file
    n_records: int | None = field(None, check=greater(0))  # synthetic only; None: enough for the splits
    synthetic_seed: int = field(0, check=at_least(0))
    tokenizer: str | None = field(None)  # None: the checkpoint's (or the synthetic one built with the data)
    max_length: int = field(512, check=at_least(2))
    overflow: Overflow = field(Overflow.TRUNCATE)
    loss_on: LossOn = field(LossOn.RESPONSE)
    add_bos: bool = field(True)
    add_eos: bool = field(True)
    train: tuple[int, int] = field((0, 10_000), check=split_range())
    probe: tuple[int, int] = field((5_000, 7_000), check=split_range())
    heldout: tuple[int, int] = field((11_000, 11_200), check=split_range())

    @property
    def is_synthetic(self) -> bool:
        return self.source == BUILTIN_DATA

    @property
    def is_local_file(self) -> bool:
        return self.source.endswith((".json", ".jsonl"))

    @property
    def required_records(self) -> int:
        """Smallest dataset size that holds every split."""
        return max(self.split(name)[1] for name in SPLIT_NAMES)

    @property
    def synthetic_records(self) -> int:
        """How many synthetic records to generate."""
        return self.n_records if self.n_records is not None else self.required_records

    @property
    def probe_overlaps_train(self) -> bool:
        """True when probe examples were also training examples (the paper's setup)."""
        return _overlap(self.probe, self.train)

    def split(self, name: str) -> tuple[int, int]:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split '{name}'; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def indices(self, name: str) -> range:
        """The record indices of split ``name``."""
        return range(*self.split(name))

    @cross_check("source")
    def _source(self) -> Iterator[Problem]:
        if not (self.is_synthetic or self.is_local_file or _HUB_ID.match(self.source)):
            yield Problem(
                "source",
                f"expected '{BUILTIN_DATA}', a hub dataset id like '{ALPACA_HUB_ID}', "
                f"or a local .json/.jsonl file, got {self.source!r}",
            )

    @cross_check("sha256")
    def _sha256(self) -> Iterator[Problem]:
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            yield Problem("sha256", f"expected 64 lowercase hex digits, got {self.sha256!r}")

    @cross_check("train", "heldout")
    def _heldout_unseen(self) -> Iterator[Problem]:
        if _overlap(self.heldout, self.train):
            yield Problem(
                "heldout",
                f"{list(self.heldout)} overlaps train {list(self.train)}; held-out examples must never be trained on",
            )

    @cross_check("source", "n_records", "train", "probe", "heldout")
    def _n_records(self) -> Iterator[Problem]:
        if self.n_records is not None and not self.is_synthetic:
            yield Problem("n_records", f"only used with source '{BUILTIN_DATA}'; remove it")
        elif self.n_records is not None and self.n_records < self.required_records:
            yield Problem(
                "n_records",
                f"{self.n_records} records cannot hold the splits (they need "
                f"{self.required_records}); raise n_records or shrink the splits",
            )


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def select_split(records: Sequence[T], config: DataConfig, name: str) -> list[T]:
    """The records of split ``name``; raises if the dataset is empty or too small for the range."""
    indices = config.indices(name)
    if not records:
        raise ValueError(f"split '{name}': the dataset is empty")
    if indices.stop > len(records):
        raise ValueError(
            f"split '{name}' needs indices {indices.start}..{indices.stop - 1} but the dataset has only "
            f"{len(records)} records; load more data or shrink data.{name}"
        )
    return [records[i] for i in indices]
