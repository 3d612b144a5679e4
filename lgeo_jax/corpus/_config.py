"""The `extract` section: which residuals go into the delta corpus and how they are stored.

Layer L is the residual stream after decoder block L (0-based), before any final norm (docs/conventions.md).
Tokens kept: every non-padding token, BOS excluded by default (its norm dominates SAE training), and with
`token_budget` a uniform sample of that many tokens of each split, one selection shared by the base, every
adapter and every layer so rows stay aligned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

from lgeo_jax.config import (
    DType,
    Problem,
    Section,
    at_least,
    cross_check,
    field,
    greater,
    nonempty_distinct,
    one_of,
    section,
)
from lgeo_jax.data import SPLIT_NAMES
from lgeo_jax.lora import AUTO

KVSTORE_SCHEMES = ("file", "gs", "s3", "memory")


def _tokens(value: int | str) -> Iterator[tuple[str, str]]:
    if value != AUTO:
        yield from greater(0)(value)
_URL = re.compile(r"^([a-z][a-z0-9+]*)://")


@section
class ExtractConfig(Section):
    """What the corpus holds (layers, splits, token selection, dtype) and where; operational knobs last."""

    layers: tuple[int, ...] = field((5, 10, 18, 22, 32, 38), check=nonempty_distinct(at_least(0)))
    splits: tuple[str, ...] = field(("probe", "heldout"), check=nonempty_distinct(one_of(SPLIT_NAMES, "split")))
    token_budget: int | None = field(None, check=greater(0))  # None: every kept token of the splits
    subsample_seed: int = field(0, check=at_least(0))
    exclude_bos: bool = field(True)
    store_dtype: DType = field(DType.BFLOAT16)
    store: str | None = field(None, affects_results=False)  # None: inside the run's corpus directory
    # Batch size and chunking fix the rows' order and layout (so a resumed corpus must keep them), not their values.
    batch_size: int = field(8, check=greater(0), affects_results=False)
    chunk_rows: int = field(1024, check=greater(0), affects_results=False)
    pad_multiple: int = field(64, check=greater(0), affects_results=False)  # few sequence lengths, few compiles
    max_pending: int = field(2, check=greater(0), affects_results=False)  # batches with writes in flight
    # On the CPU backend, tokens per device per stacked call, (1 + adapters) x rows x seq: the batch runs in
    # slices that stay under it (values unchanged). 4096 is XLA:CPU's fusion cliff (lgeo_jax.lora.CPU_FUSION_TOKENS,
    # bench/README.md (a)); `auto`: the fastest of a few budgets timed on the first batch
    # (lgeo_jax.lora.tune_micro_batch_tokens); None: the whole batch in one call. Accelerators always take the whole
    # batch.
    micro_batch_tokens: int | Literal["auto"] | None = field(4096, check=_tokens, affects_results=False)

    @cross_check("store")
    def _store(self) -> Iterator[Problem]:
        url = _URL.match(self.store or "")
        if url and url.group(1) not in KVSTORE_SCHEMES:
            yield Problem(
                "store",
                f"unsupported kvstore scheme '{url.group(1)}://'; use a local path or one "
                f"of {', '.join(s + '://' for s in KVSTORE_SCHEMES)}",
            )
