"""Where SAE training batches come from: a minimal interface and an in-memory implementation.

The interface (`BatchSource`) is what the trainer needs and nothing more, so the on-disk tensorstore corpus
reader can implement it later:

- ``names``: one label per SAE (e.g. ``"r4/L5"``), used in logs and error messages; ``n_sae = len(names)``.
- ``d_in``: feature width of every row.
- ``n_rows``: training rows per SAE (every SAE's stream has the same length; epochs are counted in it).
- ``batch(step, batch_size) -> Batch``: batch number ``step`` of the infinite stream, ``x`` shaped
  ``[n_sae, batch_size, d_in]`` float32, SAE ``s`` reading its own array, plus the row indices it served
  (``rows [n_sae, batch_size]``, indices into that SAE's array) so bad values can be traced. It must be a
  pure function of ``step``: that is what makes checkpoint resume exact.
- ``held_out(max_rows) -> [n_sae, n, d_in]``: held-out rows for reconstruction metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from jaxtyping import Float, Int


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch: activations for every SAE and which rows of each SAE's array they are."""

    x: Float[np.ndarray, "S B D"]
    rows: Int[np.ndarray, "S B"]


class BatchSource(Protocol):
    names: tuple[str, ...]
    d_in: int
    n_rows: int

    def batch(self, step: int, batch_size: int) -> Batch: ...

    def held_out(self, max_rows: int) -> Float[np.ndarray, "S N D"]: ...


class ArraySource:
    """`BatchSource` over in-memory arrays, several SAEs possibly sharing one array (an L1 sweep).

    Epoch ``e`` visits rows in the order ``permutation(seed, e)`` (one order shared by every SAE: corpus rows
    are aligned across adapters and layers); batch ``step`` is the ``step % steps_per_epoch``-th slice of
    that order, where ``steps_per_epoch = n_rows // batch_size`` (the ragged tail of an epoch is skipped).
    """

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None,
                 sae_to_array: Sequence[int] | None = None, held_out: Sequence[np.ndarray] | None = None,
                 seed: int = 0):
        if not arrays:
            raise ValueError("ArraySource: need at least one array")
        shapes = {a.shape for a in arrays}
        if any(a.ndim != 2 for a in arrays) or len(shapes) != 1:
            raise ValueError(f"ArraySource: arrays must all be 2-D [rows, d] of one shape, got {sorted(shapes)}")
        self._arrays = list(arrays)
        self._held = None if held_out is None else list(held_out)
        if self._held is not None and (len(self._held) != len(arrays)
                                       or any(h.ndim != 2 or h.shape[1] != arrays[0].shape[1] for h in self._held)):
            raise ValueError("ArraySource: held_out must hold one [rows, d] array per training array, same d")
        if self._held is not None and len({h.shape[0] for h in self._held}) != 1:
            counts = [h.shape[0] for h in self._held]
            raise ValueError(f"ArraySource: held_out arrays must all have the same row count, got {counts}")
        self.sae_to_array = tuple(range(len(arrays)) if sae_to_array is None else sae_to_array)
        if any(not 0 <= i < len(arrays) for i in self.sae_to_array):
            raise ValueError(f"ArraySource: sae_to_array {self.sae_to_array} indexes outside {len(arrays)} arrays")
        self.names = tuple(names) if names is not None else tuple(f"sae{i}" for i in range(len(self.sae_to_array)))
        if len(self.names) != len(self.sae_to_array):
            raise ValueError(f"ArraySource: {len(self.names)} names for {len(self.sae_to_array)} SAEs")
        self.n_rows, self.d_in = arrays[0].shape
        self.seed = seed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.n_rows)

    def batch(self, step: int, batch_size: int) -> Batch:
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise ValueError(f"ArraySource: batch_size {batch_size} exceeds the {self.n_rows} rows available")
        epoch, i = divmod(step, per_epoch)
        rows = self._order(epoch)[i * batch_size:(i + 1) * batch_size]  # [B]
        x = np.stack([np.asarray(self._arrays[a][rows], np.float32) for a in self.sae_to_array])  # [S, B, D]
        return Batch(x=x, rows=np.broadcast_to(rows, (len(self.sae_to_array), batch_size)))

    def held_out(self, max_rows: int) -> np.ndarray:
        if self._held is None:
            raise ValueError("ArraySource: no held_out arrays were given; pass held_out=... or set "
                             "sae.eval_rows=0")
        return np.stack([np.asarray(self._held[a][:max_rows], np.float32) for a in self.sae_to_array])  # [S, N, D]


class StackedSource:
    """Several `BatchSource`s side by side as one: SAE axis = their SAEs in order. Each part keeps its own
    row order, which is how SAEs of different seeds get different data orders in one job; every part must
    have the same ``d_in`` and ``n_rows`` (one split of one corpus, read in several orders)."""

    def __init__(self, parts: Sequence[BatchSource]):
        if not parts:
            raise ValueError("StackedSource: need at least one source")
        shapes = {(p.d_in, p.n_rows) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"StackedSource: parts differ in (d_in, n_rows): {sorted(shapes)}")
        self.parts = tuple(parts)
        self.names = tuple(n for p in parts for n in p.names)
        (self.d_in, self.n_rows), = shapes

    def batch(self, step: int, batch_size: int) -> Batch:
        batches = [p.batch(step, batch_size) for p in self.parts]
        return Batch(x=np.concatenate([b.x for b in batches]), rows=np.concatenate([b.rows for b in batches]))

    def held_out(self, max_rows: int) -> Float[np.ndarray, "S N D"]:
        return np.concatenate([p.held_out(max_rows) for p in self.parts])
