"""Content fingerprints of checkpoint directories, so a resumed corpus notices changed weights.

Files up to `lgeo_jax.files.FULL_HASH_BYTES` are hashed whole (configs, adapters); larger ones (base
weights, up to tens of GB) by size plus their first and last MiB, which covers safetensors headers (names,
shapes, offsets) and reads little (`lgeo_jax.files.paths_fingerprint`, content only: a copied checkpoint
keeps its fingerprint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lgeo_jax.files import paths_fingerprint


def directories_fingerprint(directories: Sequence[str | os.PathLike]) -> str:
    """One hash over every file (relative name, size, content digest) of the given directories, in order."""
    for directory in directories:
        if not os.path.isdir(directory):
            raise ValueError(f"{os.fspath(directory)}: checkpoint directory missing")
    return paths_fingerprint(directories)
