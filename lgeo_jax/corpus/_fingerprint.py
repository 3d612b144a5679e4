"""Content fingerprints of checkpoint directories, so a resumed corpus notices changed weights.

Files up to `FULL_HASH_BYTES` are hashed whole (configs, adapters); larger ones (base weights, up to tens
of GB) by size plus their first and last MiB, which covers safetensors headers (names, shapes, offsets)
and reads little. This catches replaced checkpoints, not a bit flip in the middle of a huge shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 1 << 20


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return f"{size}:{h.hexdigest()}"


def directories_fingerprint(directories: Sequence[str | os.PathLike]) -> str:
    """One hash over every file (relative name, size, content digest) of the given directories, in order."""
    h = hashlib.sha256()
    for directory in directories:
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory}: checkpoint directory missing")
        h.update(b"\0dir\0")
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, directory).encode() + b"\0" + _file_digest(path).encode())
    return h.hexdigest()[:32]
