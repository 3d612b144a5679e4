"""The corpus baseline a torch user reaches for: one raw numpy memmap file per (adapter, layer) array.

Rows are stored bf16 by default (the corpus's store dtype). numpy has no bfloat16, so torch converts:
the memmap holds int16 and torch views it as `torch.bfloat16`, so float32 batches are rounded straight
into the mapped file (round to nearest even) and read back the same way, with no intermediate arrays.
Writes fill a preallocated memmap batch by batch, then flush and fsync (durable, like the tensorstore
writer's commits). Shuffled reads follow the usual recipe for on-disk datasets: shuffle the order of
contiguous chunks (each chunk is one sequential read), load a buffer of several chunks, and draw batches
from a permutation of the buffer's rows; rows left over at the end of a buffer are carried into the next
one, and a final partial batch is dropped (SAE batches have a fixed size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

# store dtype -> (torch dtype of the values, numpy dtype of the file)
DTYPES = {"bfloat16": (torch.bfloat16, np.int16), "float32": (torch.float32, np.float32)}


def write_rows(
    path: str | os.PathLike, batches: Iterable[np.ndarray], n_rows: int, d_model: int, *,
    dtype: str = "bfloat16", durable: bool = True,
) -> int:
    """Writes float32 row batches ``[b, D]`` (in order, ``n_rows`` in all) to a new memmap file; returns bytes."""
    values_dtype, file_dtype = DTYPES[dtype]
    mm = np.memmap(path, dtype=file_dtype, mode="w+", shape=(n_rows, d_model))
    dest = torch.from_numpy(mm).view(values_dtype)  # [N, D], shares the mapped pages
    start = 0
    for batch in batches:
        rows = torch.from_numpy(np.asarray(batch, np.float32))  # [b, D]
        if start + rows.shape[0] > n_rows:
            raise ValueError(f"write_rows: batches hold more than n_rows={n_rows} rows")
        dest[start:start + rows.shape[0]].copy_(rows)  # converts into the file's dtype in place
        start += rows.shape[0]
    if start != n_rows:
        raise ValueError(f"write_rows: batches held {start} rows, expected n_rows={n_rows}")
    mm.flush()
    if durable:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return mm.nbytes


def open_rows(path: str | os.PathLike, d_model: int, *, dtype: str = "bfloat16") -> np.memmap:
    """The file as a read-only memmap [N, D] of its on-disk dtype (N from the file size)."""
    return np.memmap(path, dtype=DTYPES[dtype][1], mode="r").reshape(-1, d_model)


def to_float32(rows: np.ndarray, *, dtype: str = "bfloat16") -> np.ndarray:
    """On-disk rows [b, D] (in memory) -> float32 values."""
    return torch.from_numpy(rows).view(DTYPES[dtype][0]).float().numpy()


def shuffled_batches(
    path: str | os.PathLike, d_model: int, batch_size: int, *, chunk_rows: int = 1024, buffer_chunks: int = 16,
    seed: int = 0, dtype: str = "bfloat16",
) -> Iterator[np.ndarray]:
    """One shuffled epoch of float32 batches [batch_size, D] (chunk shuffle + in-buffer shuffle, see above)."""
    mm = open_rows(path, d_model, dtype=dtype)
    rng = np.random.default_rng(seed)
    chunk_starts = rng.permutation(np.arange(0, mm.shape[0], chunk_rows))
    carry = np.empty((0, d_model), mm.dtype)
    for g in range(0, len(chunk_starts), buffer_chunks):
        group = np.sort(chunk_starts[g:g + buffer_chunks])  # ascending offsets: the reads sweep the file once
        buf = np.concatenate([carry, *(mm[s:s + chunk_rows] for s in group)])  # [R, D], the disk reads
        order = rng.permutation(buf.shape[0])  # [R]
        full = buf.shape[0] // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield to_float32(buf[order[i:i + batch_size]], dtype=dtype)  # gather + convert one batch
        carry = buf[order[full:]]
