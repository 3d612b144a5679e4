"""L1 sweep (the paper's Table 12): several L1 coefficients on the same data as one vmapped job, and the
rule that picks one for an L0 target range."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from lgeo_jax.sae._config import SAEConfig, SAETrainConfig
from lgeo_jax.sae._source import ArraySource
from lgeo_jax.sae._train import train_saes


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One coefficient's outcome; ``l0`` is measured on held-out rows when given, else on the last train batch."""

    l1_coeff: float
    l0: float
    fvu: float
    heldout_rel_l2: float | None
    heldout_fvu: float | None


def l1_sweep(x: np.ndarray, l1_coeffs: Sequence[float], sae_cfg: SAEConfig, train_cfg: SAETrainConfig,
             out_dir: str | pathlib.Path, held_out: np.ndarray | None = None, seed: int = 0,
             mesh: Mesh | None = None, progress: bool = True, plot: bool = True) -> tuple[SweepPoint, ...]:
    """Train one SAE per coefficient on the same rows ``x [N, D]`` (same seed, same batches) in one job."""
    if not l1_coeffs:
        raise ValueError("l1_sweep: give at least one L1 coefficient")
    if train_cfg.eval_rows > 0 and held_out is None:
        raise ValueError("l1_sweep: pass held_out rows, or set eval_rows=0 to skip held-out metrics")
    names = [f"l1_{c:g}" for c in l1_coeffs]
    source = ArraySource([x], names=names, sae_to_array=[0] * len(l1_coeffs),
                         held_out=None if held_out is None else [held_out], seed=seed)
    result = train_saes(source, sae_cfg, train_cfg, l1_coeffs, [seed] * len(l1_coeffs), out_dir, mesh=mesh,
                        progress=progress, plot=plot)
    points = []
    for c, m in zip(l1_coeffs, result.final_metrics, strict=True):
        held = m.get("heldout_l0") is not None
        points.append(SweepPoint(float(c), float(m["heldout_l0"] if held else m["l0"]), float(m["fvu"]),
                                 m.get("heldout_rel_l2"), m.get("heldout_fvu")))
    return tuple(points)


def pick_l1(points: Sequence[SweepPoint], l0_range: tuple[float, float] = (20.0, 50.0)) -> SweepPoint:
    """The point whose L0 is closest (in log L0) to ``l0_range``; among several inside, the one nearest the
    range's geometric centre (the paper's 20-50 target picks L0 31.4 over 42.9 this way)."""
    lo, hi = l0_range
    if not 0 < lo <= hi:
        raise ValueError(f"pick_l1: l0_range must satisfy 0 < low <= high, got {l0_range}")
    if not points:
        raise ValueError("pick_l1: no sweep points")
    centre = math.log(math.sqrt(lo * hi))

    def key(p: SweepPoint):
        log_l0 = math.log(max(p.l0, 1e-9))
        outside = max(math.log(lo) - log_l0, log_l0 - math.log(hi), 0.0)
        return outside, abs(log_l0 - centre)

    return min(points, key=key)
