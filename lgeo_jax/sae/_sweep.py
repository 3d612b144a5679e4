"""L1 sweep (the paper's Table 12): several L1 coefficients on the same data as one vmapped job; the search
that keeps sweeping until a coefficient lands inside an L0 target range; and the rule that picks one."""

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


def _inside(p: SweepPoint, l0_range: tuple[float, float]) -> bool:
    return l0_range[0] <= p.l0 <= l0_range[1]


def _nice(c: float) -> float:
    return float(f"{c:.3g}")


def next_grid(points: Sequence[SweepPoint], l0_range: tuple[float, float], n: int) -> tuple[float, ...]:
    """The ``n`` coefficients to try after ``points`` missed ``l0_range`` (L0 falls as L1 grows): log-spaced
    strictly inside the tightest bracketing pair (one L0 above the range, the next larger coefficient's
    below), or, when every L0 lies on one side, continuing the grid's log spacing (at least x2 per point)
    beyond its end on the side the range lies. Rounded to 3 significant digits."""
    lo, hi = l0_range
    pts = sorted(points, key=lambda p: p.l1_coeff)
    tried = {p.l1_coeff for p in pts}
    above = [p for p in pts if p.l0 > hi]
    below = [p for p in pts if p.l0 < lo]
    if above and below and max(p.l1_coeff for p in above) < max(p.l1_coeff for p in below):
        a = max(p.l1_coeff for p in above)
        b = min(p.l1_coeff for p in below if p.l1_coeff > a)
        grid = np.exp(np.linspace(math.log(a), math.log(b), n + 2)[1:-1])
    else:
        cs = [p.l1_coeff for p in pts]
        step = max((max(cs) / min(cs)) ** (1 / (len(cs) - 1)) if len(cs) > 1 else 10.0, 2.0)
        # too dense (L0 above the range, or mixed without a clean bracket): stronger penalties; too sparse: weaker
        grid = max(cs) * step ** np.arange(1, n + 1) if above else min(cs) / step ** np.arange(1, n + 1)
    return tuple(sorted({_nice(c) for c in grid} - tried))


@dataclasses.dataclass(frozen=True)
class SweepSearch:
    """What `search_l1` found: every point tried (coefficient order), the pick, and whether it is on target."""

    points: tuple[SweepPoint, ...]
    chosen: SweepPoint
    on_target: bool
    rounds: int  # sweep jobs run (1: the grid alone)
    l0_range: tuple[float, float]
    next_grid: tuple[float, ...]  # what to try next when off target (empty when on target)

    def off_target_message(self) -> str:
        lo, hi = self.l0_range
        found = ", ".join(f"L1 {p.l1_coeff:g} -> L0 {p.l0:.1f}" for p in self.points)
        grid = ", ".join(f"{c:g}" for c in self.next_grid)
        return (f"sae.l1_sweep: no L1 coefficient gave a held-out L0 inside sae.l0_target [{lo:g}, {hi:g}] after "
                f"{self.rounds} sweep round(s): {found}; try sae.l1_sweep: [{grid}] (or sae.allow_off_target: true "
                f"to take the nearest, L1 {self.chosen.l1_coeff:g} at L0 {self.chosen.l0:.1f})")


def search_l1(x: np.ndarray, grid: Sequence[float], sae_cfg: SAEConfig, train_cfg: SAETrainConfig,
              out_dir: str | pathlib.Path, l0_range: tuple[float, float], rounds: int,
              held_out: np.ndarray | None = None, seed: int = 0, mesh: Mesh | None = None, progress: bool = True,
              plot: bool = True) -> SweepSearch:
    """`l1_sweep` over ``grid`` in ``out_dir``, then, while no point is inside ``l0_range``, up to ``rounds``
    more sweeps of as many coefficients (`next_grid`) in ``out_dir/round<r>``. Every round is its own resumable
    job, and each round's grid follows from the points before it, so a rerun retraces (and skips) the same
    rounds."""
    out_dir = pathlib.Path(out_dir)
    points = list(l1_sweep(x, grid, sae_cfg, train_cfg, out_dir, held_out=held_out, seed=seed, mesh=mesh,
                           progress=progress, plot=plot))
    done = 1
    while not any(_inside(p, l0_range) for p in points) and done <= rounds:
        more = next_grid(points, l0_range, len(grid))
        if not more:
            break
        points += l1_sweep(x, more, sae_cfg, train_cfg, out_dir / f"round{done}", held_out=held_out, seed=seed,
                           mesh=mesh, progress=progress, plot=plot)
        done += 1
    points.sort(key=lambda p: p.l1_coeff)
    on_target = any(_inside(p, l0_range) for p in points)
    return SweepSearch(tuple(points), pick_l1(points, l0_range), on_target, done, tuple(l0_range),
                       () if on_target else next_grid(points, l0_range, len(grid)))


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
