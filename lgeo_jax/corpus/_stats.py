"""Running statistics gathered during extraction (no second pass over the corpus).

Per split and per (array, layer): the token count, the sum of norms (mean ||delta|| is the paper's
Table 4) and the sum of squared norms (the SAE's RMS scale s = sqrt(sum ||x||^2 / (count d))). Batch sums
are taken in float32 on the device from the float32 values (before any bf16 rounding) and accumulated
here in float64, in batch order, so a resumed run reproduces an uninterrupted run's sums exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

STATS_FILE = "stats.json"


@dataclasses.dataclass
class SplitStats:
    """Sums over the committed batches of one split; `norm_sum` / `sq_sum` are [n_arrays, n_layers]."""

    count: int
    norm_sum: np.ndarray
    sq_sum: np.ndarray

    @classmethod
    def zeros(cls, n_arrays: int, n_layers: int) -> SplitStats:
        return cls(0, np.zeros((n_arrays, n_layers)), np.zeros((n_arrays, n_layers)))

    def add(self, count: int, norm_sum: Float[np.ndarray, "A C"], sq_sum: Float[np.ndarray, "A C"]) -> None:
        self.count += int(count)
        self.norm_sum = self.norm_sum + np.asarray(norm_sum, np.float64)
        self.sq_sum = self.sq_sum + np.asarray(sq_sum, np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "norm_sum": self.norm_sum.tolist(), "sq_sum": self.sq_sum.tolist()}

    @classmethod
    def from_json(cls, value: Mapping[str, Any], shape: tuple[int, int]) -> SplitStats:
        stats = cls(int(value["count"]), np.asarray(value["norm_sum"], np.float64),
                    np.asarray(value["sq_sum"], np.float64))
        if stats.norm_sum.shape != shape or stats.sq_sum.shape != shape:
            raise ValueError(f"corpus progress: statistics of shape {stats.norm_sum.shape}, expected {shape}; "
                             "the manifest belongs to another layout, rerun the corpus stage with force")
        return stats


def summarize(stats: Mapping[str, SplitStats], names: Sequence[str], layers: Sequence[int],
              d_model: int) -> dict[str, Any]:
    """`{split: {name: {"L<layer>": {count, mean_norm, rms_scale, norm_sum, sq_sum}}}}` (JSON-ready)."""
    out: dict[str, Any] = {}
    for split, s in stats.items():
        out[split] = {}
        for a, name in enumerate(names):
            out[split][name] = {}
            for c, layer in enumerate(layers):
                n = s.count
                out[split][name][f"L{layer}"] = {
                    "count": n,
                    "mean_norm": s.norm_sum[a, c] / n if n else None,
                    "rms_scale": math.sqrt(s.sq_sum[a, c] / (n * d_model)) if n else None,
                    "norm_sum": s.norm_sum[a, c],
                    "sq_sum": s.sq_sum[a, c],
                }
    return out


def load_stats(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """The statistics a finished corpus stage saved (see `summarize` for the structure)."""
    path = os.path.join(stage_dir, STATS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing; run the corpus stage to completion first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
