"""Shuffled, prefetching SAE batches straight from the corpus store (`lgeo_jax.sae.BatchSource`).

The corpus never has to fit in memory. Epoch `e`'s order is a pure function of `(seed, e)`: shuffle the
chunks, deal them to shards (`shard_index::shard_count`, one shard per host), cut each shard's chunks into
windows of `buffer_rows` rows, shuffle the rows inside each window. Batch `step` is the `step %
steps_per_epoch`-th slice of the shard's order, so it is a pure function of `step` (exact resume) and
every row is served once per epoch (a ragged tail shorter than a batch is skipped, as `ArraySource`).
A background thread reads the next windows (whole chunks, all SAEs' arrays) while the trainer consumes
the current one; resident memory is bounded by (windows a batch touches + `prefetch`) windows.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

from lgeo_jax.corpus._reader import Corpus
from lgeo_jax.sae import Batch


@dataclasses.dataclass(frozen=True, eq=False)
class _EpochPlan:
    windows: tuple[np.ndarray, ...]  # chunk ids of each window (this shard)
    global_rows: Int[np.ndarray, " N"]  # this shard's epoch order, as corpus row indices
    window: Int[np.ndarray, " N"]  # window of each position
    local: Int[np.ndarray, " N"]  # row inside that window's buffer


class CorpusSource:
    """`BatchSource` over corpus arrays of one split: SAE `s` reads `arrays[s] = (name, layer)`.

    `batch(step, batch_size)` returns this shard's `batch_size // shard_count` rows of global batch
    `step`; `rows` are corpus row indices. `held_out(max_rows)` reads a fixed random subset of
    `held_out_split`.
    """

    def __init__(self, corpus: Corpus, split: str, arrays: Sequence[tuple[str, int]], *,
                 names: Sequence[str] | None = None, held_out_split: str | None = None, seed: int = 0,
                 buffer_rows: int = 1 << 16, prefetch: int = 1, shard_index: int = 0, shard_count: int = 1):
        if not arrays:
            raise ValueError("CorpusSource: need at least one (name, layer) array")
        for name, layer in arrays:
            corpus.array(split, name, layer)  # validates the key
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"CorpusSource: shard_index {shard_index} not in [0, {shard_count})")
        chunk = corpus.layout.chunk_rows
        if buffer_rows < chunk:
            raise ValueError(f"CorpusSource: buffer_rows={buffer_rows} cannot hold one chunk ({chunk} rows)")
        if prefetch < 0:
            raise ValueError(f"CorpusSource: prefetch={prefetch} must be >= 0")
        self.corpus, self.split, self.arrays = corpus, split, tuple((str(n), int(lay)) for n, lay in arrays)
        # an array that several SAEs read (the base stream of every adapter's crosscoder) is read once
        self._unique = tuple(dict.fromkeys(self.arrays))
        self._slot = None if len(self._unique) == len(self.arrays) else np.array(
            [self._unique.index(a) for a in self.arrays])  # [S] -> index into the unique arrays
        self.names = tuple(names) if names is not None else tuple(f"{n}/L{lay}" for n, lay in self.arrays)
        if len(self.names) != len(self.arrays):
            raise ValueError(f"CorpusSource: {len(self.names)} names for {len(self.arrays)} arrays")
        self.d_in = corpus.d_model
        self.n_rows = corpus.n_rows(split)
        self.held_out_split = held_out_split
        self.seed, self.prefetch = seed, prefetch
        self.shard_index, self.shard_count = shard_index, shard_count
        self._chunk = chunk
        self._n_chunks = -(-self.n_rows // chunk)
        self._window_chunks = buffer_rows // chunk
        self._plans: collections.OrderedDict = collections.OrderedDict()  # epoch -> plan; 2 kept
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpus-prefetch")
        self._windows: collections.OrderedDict = collections.OrderedDict()  # (epoch, w) -> (Future, rows)
        self._lock = threading.Lock()
        self.peak_resident_rows = 0  # the most rows held in loaded or loading windows (for memory checks)

    # ---- the epoch order ------------------------------------------------------------------------

    def _chunk_rows(self, c: int) -> np.ndarray:
        return np.arange(c * self._chunk, min((c + 1) * self._chunk, self.n_rows))

    def _steps(self, local_batch: int) -> int:
        """Batches per epoch: the fewest rows any shard can be dealt in any epoch (the short last chunk may
        land anywhere) over the local batch, so the count does not depend on the epoch."""
        short = self._n_chunks * self._chunk - self.n_rows
        least = max((self._n_chunks // self.shard_count) * self._chunk - short, 0)
        if least < local_batch:
            raise ValueError(f"CorpusSource: batch of {local_batch} rows per shard exceeds the {least} rows "
                             f"a shard of split '{self.split}' is sure to hold")
        return least // local_batch

    def _epoch_plan(self, epoch: int) -> _EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        chunks = np.random.default_rng((self.seed, epoch)).permutation(self._n_chunks)  # [n_chunks]
        mine = chunks[self.shard_index::self.shard_count]
        windows = tuple(mine[i:i + self._window_chunks] for i in range(0, mine.size, self._window_chunks))
        rows, window, local = [], [], []
        for w, ids in enumerate(windows):
            in_window = np.concatenate([self._chunk_rows(c) for c in ids])  # [W]
            perm = np.random.default_rng((self.seed, epoch, self.shard_index, w)).permutation(in_window.size)
            rows.append(in_window[perm])
            window.append(np.full(perm.size, w))
            local.append(perm)
        plan = _EpochPlan(windows, np.concatenate(rows), np.concatenate(window), np.concatenate(local))
        self._plans[epoch] = plan
        while len(self._plans) > 2:  # this epoch and the next (prefetched across the boundary)
            self._plans.popitem(last=False)
        return plan

    # ---- window buffers -------------------------------------------------------------------------

    def _load(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Every distinct array's rows of these chunks, `[U, W, D]` in the store dtype, read concurrently."""
        spans = [(c * self._chunk, min((c + 1) * self._chunk, self.n_rows)) for c in chunk_ids]
        handles = [self.corpus.array(self.split, n, lay) for n, lay in self._unique]
        futures = [[h[a:b].read() for a, b in spans] for h in handles]
        out = np.empty((len(handles), sum(b - a for a, b in spans), self.d_in), handles[0].dtype.numpy_dtype)
        for s, per_array in enumerate(futures):
            at = 0
            for (a, b), f in zip(spans, per_array, strict=True):
                out[s, at:at + b - a] = f.result()
                at += b - a
        return out

    def _window(self, epoch: int, w: int, plan: _EpochPlan) -> concurrent.futures.Future:
        with self._lock:
            key = (epoch, w)
            if key not in self._windows:
                size = int(np.sum(plan.window == w))
                self._windows[key] = (self._pool.submit(self._load, plan.windows[w]), size)
                resident = sum(n for _, n in self._windows.values())
                self.peak_resident_rows = max(self.peak_resident_rows, resident)
            return self._windows[key][0]

    def _evict_before(self, key: tuple[int, int]) -> None:
        with self._lock:
            for k in [k for k in self._windows if k < key]:
                del self._windows[k]

    # ---- BatchSource ----------------------------------------------------------------------------

    def batch(self, step: int, batch_size: int) -> Batch:
        if batch_size % self.shard_count:
            raise ValueError(f"CorpusSource: batch_size {batch_size} is not divisible by {self.shard_count} shards")
        local_batch = batch_size // self.shard_count
        epoch, i = divmod(step, self._steps(local_batch))
        plan = self._epoch_plan(epoch)
        sel = slice(i * local_batch, (i + 1) * local_batch)
        windows, local = plan.window[sel], plan.local[sel]  # [b], [b]
        needed = np.unique(windows)
        self._evict_before((epoch, int(needed[0])))
        data = {int(w): self._window(epoch, int(w), plan) for w in needed}
        ahead_epoch, ahead = epoch, int(needed[-1])
        for _ in range(self.prefetch):  # the next windows, into the next epoch if this one ends
            ahead += 1
            if ahead == len(self._epoch_plan(ahead_epoch).windows):
                ahead_epoch, ahead = ahead_epoch + 1, 0
            self._window(ahead_epoch, ahead, self._epoch_plan(ahead_epoch))
        rows = np.broadcast_to(plan.global_rows[sel], (len(self.arrays), local_batch))  # [S, b]
        if len(data) == 1:  # the common case: the whole batch comes from one window
            return Batch(x=self._per_sae(next(iter(data.values())).result()[:, local].astype(np.float32)), rows=rows)
        x = np.empty((len(self._unique), local_batch, self.d_in), np.float32)  # [U, b, D]
        for w, future in data.items():
            at = np.flatnonzero(windows == w)
            # Gather in the store dtype, then one contiguous cast (casting inside fancy assignment is slow).
            x[:, at] = future.result()[:, local[at]].astype(np.float32)
        return Batch(x=self._per_sae(x), rows=rows)

    def _per_sae(self, x: np.ndarray) -> np.ndarray:
        """[U, ...] rows of the distinct arrays -> [S, ...], one per SAE."""
        return x if self._slot is None else x[self._slot]

    def held_out(self, max_rows: int) -> Float[np.ndarray, "S N D"]:
        if self.held_out_split is None:
            raise ValueError("CorpusSource: no held_out_split was given")
        n = self.corpus.n_rows(self.held_out_split)
        pick = np.sort(np.random.default_rng((self.seed, n)).permutation(n)[:max_rows])  # [N]
        return self._per_sae(np.stack([self.corpus.rows(self.held_out_split, name, layer, pick)
                                       for name, layer in self._unique]))

    def close(self) -> None:
        """Stops the prefetch thread (pending reads finish first)."""
        self._pool.shutdown(wait=True)
        self._windows.clear()

    def __enter__(self) -> CorpusSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
