"""The corpus on tensorstore: where each array lives, its zarr3 spec, and the store's identity file.

Layout under the store root (a local directory or any tensorstore kvstore URL: file://, gs://, s3://,
memory://)::

    corpus.json                         identity + shape of everything below (written first)
    <split>/meta/<field>                int32 [N]: sample_index, position, token_id, category
    <split>/base/L<layer>               [N, D] h_base (store dtype)
    <split>/<adapter>/L<layer>          [N, D] delta = h_adapter - h_base (subtracted in float32)

Row r of every array of a split is the same token, so base, every adapter and every layer stay aligned.
Chunks are `[chunk_rows, D]` (whole rows: a shuffled SAE reader fetches a chunk and uses all of it), the
`crc32c` codec makes a corrupted chunk a read error, `fill_missing_data_reads: false` makes a missing
chunk a read error instead of zeros, and `store_data_equal_to_fill_value: true` keeps an all-zero chunk
(an untrained adapter's delta) on disk instead of deleting it, which would then read as missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tensorstore as ts

CORPUS_FORMAT = 1
IDENTITY_FILE = "corpus.json"
META_FIELDS = ("sample_index", "position", "token_id", "category")
BASE_NAME = "base"
STORE_DTYPES = ("bfloat16", "float32")
_URL = re.compile(r"^[a-z][a-z0-9+]*://")

CONTEXT = ts.Context()
"""One tensorstore context per process, so `memory://` stores outlive the handle that wrote them."""


def store_url(location: str | os.PathLike) -> str:
    """A kvstore URL with a trailing slash: URLs pass through, local paths become absolute file:// URLs."""
    location = os.fspath(location)
    url = location if _URL.match(location) else "file://" + os.path.abspath(location)
    return url if url.endswith("/") else url + "/"


@dataclasses.dataclass(frozen=True)
class CorpusLayout:
    """Everything that fixes the store's shape; saved (with `identity`) as `corpus.json`."""

    d_model: int
    layers: tuple[int, ...]
    adapters: tuple[str, ...]  # delta arrays, one per adapter, e.g. ("r4", "r8")
    split_rows: Mapping[str, int]  # split -> rows
    store_dtype: str
    chunk_rows: int
    categories: tuple[str, ...]  # category code -> name
    identity: str  # hash of the config, inputs and plan that produced the rows

    def __post_init__(self):
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"corpus store_dtype {self.store_dtype!r}: expected one of {STORE_DTYPES}")
        if self.chunk_rows < 1 or self.d_model < 1:
            raise ValueError(f"corpus chunk_rows={self.chunk_rows}, d_model={self.d_model}: both must be >= 1")
        if BASE_NAME in self.adapters or "meta" in self.adapters:
            raise ValueError(f"adapter names {self.adapters}: '{BASE_NAME}' and 'meta' are reserved")
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "split_rows", {k: int(v) for k, v in self.split_rows.items()})
        object.__setattr__(self, "categories", tuple(self.categories))

    @property
    def names(self) -> tuple[str, ...]:
        """Every activation array per (split, layer): the base, then each adapter's delta."""
        return (BASE_NAME, *self.adapters)

    def to_json(self) -> dict[str, Any]:
        return {"format": CORPUS_FORMAT, **dataclasses.asdict(self), "split_rows": dict(self.split_rows)}

    @classmethod
    def from_json(cls, value: Any, source: str) -> CorpusLayout:
        try:
            if value["format"] != CORPUS_FORMAT:
                raise ValueError(f"format {value['format']!r}, expected {CORPUS_FORMAT}")
            fields = {f.name: value[f.name] for f in dataclasses.fields(cls)}
            return cls(**{**fields, "layers": tuple(fields["layers"]), "adapters": tuple(fields["adapters"]),
                          "categories": tuple(fields["categories"])})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a corpus identity file ({type(e).__name__}: {e})") from e


def array_path(split: str, name: str, layer: int | None = None) -> str:
    """Relative path of an activation array (`layer` given) or a metadata field (`name` in META_FIELDS)."""
    return f"{split}/meta/{name}/" if layer is None else f"{split}/{name}/L{int(layer)}/"


def _spec(url: str, path: str, shape: Sequence[int] | None, dtype: str, chunk: Sequence[int] | None) -> dict:
    spec: dict[str, Any] = {
        "driver": "zarr3",
        "kvstore": url + path,
        "fill_missing_data_reads": False,
        "store_data_equal_to_fill_value": True,
    }
    if shape is not None:
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        }
    return spec


def open_array(url: str, path: str, *, shape: Sequence[int], dtype: str, chunk: Sequence[int],
               create: bool) -> ts.TensorStore:
    """Opens an existing array, checking its shape and dtype; with `create`, makes it if absent.

    An existing array of another shape or dtype is an error (never resized or rewritten), so a resumed or
    mismatched run cannot silently mix two corpora.
    """
    try:
        arr = ts.open(_spec(url, path, None, dtype, None), context=CONTEXT, open=True).result()
    except ValueError as e:
        if "NOT_FOUND" not in str(e):
            raise ValueError(f"corpus array {url}{path}: cannot open ({e})") from e
        if not create:
            raise ValueError(f"corpus array {url}{path} is missing; the corpus is incomplete") from e
        return ts.open(_spec(url, path, shape, dtype, chunk), context=CONTEXT, create=True).result()
    found_shape, found_dtype = tuple(arr.shape), arr.dtype.name
    if found_shape != tuple(shape) or found_dtype != dtype:
        raise ValueError(
            f"corpus array {url}{path} has shape {found_shape} and dtype {found_dtype}, expected {tuple(shape)} "
            f"and {dtype}: the store holds another corpus; delete it or point extract.store elsewhere"
        )
    return arr


def read_identity(url: str) -> CorpusLayout | None:
    """The layout recorded in the store's `corpus.json`, or None if there is none."""
    kv = ts.KvStore.open(url, context=CONTEXT).result()
    found = kv.read(IDENTITY_FILE).result()
    if found.state != "value":
        return None
    try:
        value = json.loads(found.value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url}{IDENTITY_FILE}: not valid JSON ({e})") from e
    return CorpusLayout.from_json(value, url + IDENTITY_FILE)


def claim_store(url: str, layout: CorpusLayout) -> None:
    """Writes `corpus.json`, or checks that the one already there describes the same corpus.

    Called before any array is created or written, so a store made by another config, other inputs or
    another plan is refused with nothing touched.
    """
    found = read_identity(url)
    if found is None:
        kv = ts.KvStore.open(url, context=CONTEXT).result()
        text = json.dumps(layout.to_json(), indent=2, sort_keys=True) + "\n"
        kv.write(IDENTITY_FILE, text.encode("utf-8")).result()
        return
    if found != layout:
        diff = [f.name for f in dataclasses.fields(CorpusLayout) if getattr(found, f.name) != getattr(layout, f.name)]
        raise ValueError(
            f"{url}{IDENTITY_FILE}: the store holds a corpus made from another config or inputs "
            f"(differs in {', '.join(diff)}); nothing was written. Delete the store or set extract.store "
            "to another location"
        )


def activation_shape(layout: CorpusLayout, split: str) -> tuple[int, int]:
    return (layout.split_rows[split], layout.d_model)


def open_corpus_arrays(url: str, layout: CorpusLayout, *, create: bool) -> dict[tuple, ts.TensorStore]:
    """Every array of the corpus keyed by `(split, name, layer)` and `(split, "meta", field)`."""
    arrays: dict[tuple, ts.TensorStore] = {}
    for split, rows in layout.split_rows.items():
        for name in META_FIELDS:
            arrays[(split, "meta", name)] = open_array(url, array_path(split, name), shape=(rows,), dtype="int32",
                                                       chunk=(max(1, 16 * layout.chunk_rows),), create=create)
        for name in layout.names:
            for layer in layout.layers:
                arrays[(split, name, layer)] = open_array(
                    url, array_path(split, name, layer), shape=activation_shape(layout, split),
                    dtype=layout.store_dtype, chunk=(layout.chunk_rows, layout.d_model), create=create)
    return arrays


def itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4}[dtype]
