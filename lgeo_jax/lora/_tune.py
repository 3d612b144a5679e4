"""The stacked pass's micro-batch chosen by a quick measurement instead of a fixed token threshold.

XLA:CPU's per-token cost of one call depends on its size in ways a constant only approximates (the fusion
cliff at `CPU_FUSION_TOKENS`, cache effects below it; bench/README.md (a)), and the threshold is XLA's, so it may
move between versions and machines. `tune_micro_batch_tokens` times the candidate micro-batches on the first
batch (each candidate's compile excluded) and returns the fastest as a token budget, which `micro_batch_size`
then applies to every batch of the run (batches of other lengths get as many rows as fit the same budget).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from lgeo_jax.lora._residuals import CPU_FUSION_TOKENS, micro_batch_size

AUTO = "auto"  # the config spelling of "tune the micro-batch on the first batch"

_log = logging.getLogger(__name__)


def candidate_micro_batches(batch: int, seq: int, n_models: int, *, shards: int = 1) -> tuple[int, ...]:
    """Sequences per call worth timing: 1, 2, 4, ... rows per batch shard (a multiple of `shards`, as
    `micro_batch_size` keeps), the fusion-cliff budget's size, and the whole batch."""
    rows = {batch, micro_batch_size(batch, seq, n_models, CPU_FUSION_TOKENS, shards=shards)}
    per_shard = 1
    while per_shard * shards < batch:
        rows.add(per_shard * shards)
        per_shard *= 2
    return tuple(sorted(rows))


def fastest_micro_batch(run: Callable[[int], object], candidates: Sequence[int], *, repeats: int = 2,
                        clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict[int, float]]:
    """Times `run(micro_batch)` (it must block until its work is done) for each candidate: one untimed call
    first (compilation, allocation), then the best of `repeats` calls. Returns the fastest candidate (the
    larger one on a tie: fewer calls) and every candidate's seconds."""
    if not candidates:
        raise ValueError("fastest_micro_batch: no candidates to time")
    if repeats < 1:
        raise ValueError(f"fastest_micro_batch: repeats must be >= 1, got {repeats}")
    seconds = {}
    for m in candidates:
        run(m)
        best = float("inf")
        for _ in range(repeats):
            t0 = clock()
            run(m)
            best = min(best, clock() - t0)
        seconds[m] = best
    return min(seconds, key=lambda m: (seconds[m], -m)), seconds


def tune_micro_batch_tokens(run: Callable[[int], object], batch: int, seq: int, n_models: int, *,
                            shards: int = 1, repeats: int = 2) -> int:
    """The per-device token budget (`micro_batch_size`'s `max_tokens`) of the fastest micro-batch for a
    `[batch, seq]` batch of `n_models` models; `run(micro_batch)` runs that batch and blocks."""
    best, seconds = fastest_micro_batch(run, candidate_micro_batches(batch, seq, n_models, shards=shards),
                                        repeats=repeats)
    per_shard = -(-best // shards)
    tokens = per_shard * n_models * seq
    _log.info("micro-batch tuned on a %d x %d batch of %d models: %s -> %d rows (%d tokens per device)", batch, seq,
              n_models, ", ".join(f"{m} rows {s * 1e3:.0f} ms" for m, s in seconds.items()), best, tokens)
    return tokens
