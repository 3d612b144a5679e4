"""Random access to a finished corpus: rows by index, a whole split's rows, token metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorstore as ts
from jaxtyping import Float, Int

from lgeo_jax.corpus._store import (
    BASE_NAME,
    META_FIELDS,
    CorpusLayout,
    open_corpus_arrays,
    read_identity,
    store_url,
)


class Corpus:
    """An opened corpus store. Arrays are addressed by `(split, name, layer)` where `name` is `"base"`
    (h_base) or an adapter name (its delta). Every array of a split has `n_rows(split)` aligned rows.

    Opening checks that every array exists with the recorded shape and dtype; reading a missing or
    corrupted chunk raises `ValueError` (never zeros).
    """

    def __init__(self, store: str | os.PathLike):
        self.url = store_url(store)
        layout = read_identity(self.url)
        if layout is None:
            raise ValueError(f"{self.url}: no corpus here (corpus.json missing); run the corpus stage first")
        self.layout: CorpusLayout = layout
        self._arrays = open_corpus_arrays(self.url, layout, create=False)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.layout.split_rows)

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    def n_rows(self, split: str) -> int:
        self._check(split, BASE_NAME, self.layout.layers[0])
        return self.layout.split_rows[split]

    def array(self, split: str, name: str, layer: int) -> ts.TensorStore:
        """The tensorstore handle of one activation array (for custom reads)."""
        self._check(split, name, layer)
        return self._arrays[(split, name, int(layer))]

    def rows(self, split: str, name: str, layer: int, index: Sequence[int] | np.ndarray | slice,
             dtype=np.float32) -> Float[np.ndarray, "N D"]:
        """Rows `index` (integer array or slice) of one array, converted to `dtype`."""
        arr = self.array(split, name, layer)
        if isinstance(index, slice):
            return np.asarray(arr[index].read().result(), dtype)
        index = np.asarray(index, np.int64)
        if index.ndim != 1:
            raise ValueError(f"rows: index must be 1-D, got shape {index.shape}")
        n = self.layout.split_rows[split]
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"rows: index out of range for split '{split}' with {n} rows")
        if not index.size:
            return np.zeros((0, self.d_model), dtype)
        return np.asarray(arr[index].read().result(), dtype)

    def split_rows(self, split: str, name: str, layer: int, dtype=np.float32) -> Float[np.ndarray, "N D"]:
        """All rows of one (split, name, layer) array."""
        return self.rows(split, name, layer, slice(None), dtype)

    def meta(self, split: str) -> dict[str, Int[np.ndarray, " N"]]:
        """Per-row `sample_index`, `position`, `token_id` and `category` (code into `layout.categories`)."""
        if split not in self.layout.split_rows:
            raise ValueError(f"split '{split}' is not in this corpus (splits: {list(self.splits)})")
        return {f: np.asarray(self._arrays[(split, "meta", f)].read().result()) for f in META_FIELDS}

    def _check(self, split: str, name: str, layer: int) -> None:
        if split not in self.layout.split_rows:
            raise ValueError(f"split '{split}' is not in this corpus (splits: {list(self.splits)})")
        if name not in self.layout.names:
            raise ValueError(f"'{name}' is not in this corpus (arrays: {list(self.layout.names)})")
        if int(layer) not in self.layout.layers:
            raise ValueError(f"layer {layer} is not in this corpus (layers: {list(self.layout.layers)})")


def open_corpus(store: str | os.PathLike) -> Corpus:
    """Opens the corpus at a local path or kvstore URL (file://, gs://, memory://...)."""
    return Corpus(store)
