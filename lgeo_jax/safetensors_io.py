"""safetensors files, read and written without torch: memory-mapped, validated, bfloat16 included.

Why not `safetensors.safe_open` / `safetensors.numpy`: numpy has no bfloat16, so `safetensors.numpy`
refuses BF16 tensors (Gemma-2 checkpoints, sparsify and some SAELens releases store them) and the only
library path that reads them is `safetensors.torch`, while the product must run without torch. The
format is simple (8-byte little-endian header length, a JSON header of name -> dtype / shape / byte
range, then the raw little-endian bytes), so we read it with `np.memmap` and `ml_dtypes.bfloat16`
views, and check every header field before a byte of data is used: a hostile or truncated file fails
with a message naming the file and tensor, never by reading header bytes as weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from lgeo_jax.files import atomic_write_bytes

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit (safetensors refuses larger headers)


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file (and tensor)."""


class SafetensorsFile:
    """A memory-mapped safetensors file whose header has been validated against the file itself."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                       f"file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: safetensors header is a {type(header).__name__}, not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{self.path}: safetensors __metadata__ is not a JSON object")
        self.metadata: dict = metadata
        self._data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._entry(name, e, size - self._data_start) for name, e in header.items()}
        spans = sorted((start, end, name) for name, (_, _, start, end) in self.entries.items() if end > start)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise SafetensorsError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def _entry(self, name: str, e, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise SafetensorsError(f"{where}: header entry is not a JSON object")
        dtype = DTYPES.get(e.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{where} has unsupported dtype {e.get('dtype')!r}")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(v) is int for v in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not [start, end] with 0 <= start <= end")
        start, end = offsets
        if end - start != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(f"{where}: byte range {start}..{end} does not match shape {tuple(shape)} x {dtype}")
        if end > data_bytes:
            raise SafetensorsError(f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                                   f"{self._data_start + end} but the file has {self._data_start + data_bytes} bytes")
        return dtype, tuple(shape), start, end

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor (no copy until the caller transforms it)."""
        if name not in self.entries:
            raise SafetensorsError(f"{self.path}: no tensor {name!r} (has {sorted(self.entries)[:8]})")
        dtype, shape, start, end = self.entries[name]
        if start == end:
            return np.zeros(shape, dtype)
        raw = self._map[self._data_start + start:self._data_start + end]
        return raw.view(dtype).reshape(shape)


def read_safetensors(path: str | os.PathLike, *, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the file as an in-memory array, cast to `dtype` when given (e.g. float32)."""
    f = SafetensorsFile(path)
    return {name: np.array(f.get(name), dtype=dtype) for name in f.entries}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (bfloat16 included) atomically in the format every safetensors reader loads."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + b"".join(blobs))
