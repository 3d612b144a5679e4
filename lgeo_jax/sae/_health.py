"""Training health of one SAE: did it learn a sparse dictionary, or does the study measure its initialisation?

An SAE is `healthy` when its L0 lies inside its target range and below d_in (more active latents than input
dimensions is not a sparse code: a d_in-component PCA would do as well), and at least half its decoder rows
moved away from their initial directions (cosine with the own initial row < `MOVED_COS`). Dead fraction
and held-out FVU are reported beside these, not judged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from lgeo_jax.sae._models import SAE

MOVED_COS = 0.9
"""A decoder row with cosine below this to its own initial row has moved."""
MOVED_NEEDED = 0.5
"""The share of rows that must have moved."""


@dataclasses.dataclass(frozen=True)
class SAEHealth:
    l0: float
    dead_fraction: float
    cos_to_init_median: float
    moved_fraction: float
    heldout_fvu: float | None
    healthy: bool
    problems: tuple[str, ...]  # why it is not healthy, in words (empty when healthy)

    def to_json(self) -> dict:
        return {"l0": self.l0, "dead_fraction": self.dead_fraction, "cos_to_init_median": self.cos_to_init_median,
                "moved_fraction": self.moved_fraction, "heldout_fvu": self.heldout_fvu,
                "healthy": int(self.healthy), "problems": list(self.problems)}


def sae_health(sae: SAE, initial_decoder: np.ndarray, metrics: Mapping[str, float | None],
               l0_target: tuple[float, float]) -> SAEHealth:
    """Health of a trained `sae` from its initial decoder ``[F, D]`` and its final logged `metrics`
    (``heldout_l0`` or, without held-out rows, the last batch's ``l0``; ``dead_frac``; ``heldout_fvu``)."""
    w, w0 = np.asarray(sae.params["W_dec"], np.float64), np.asarray(initial_decoder, np.float64)  # [F, D]
    if w.shape != w0.shape:
        raise ValueError(f"sae_health: initial decoder has shape {w0.shape}, the SAE's is {w.shape}")
    cos = np.sum(w * w0, axis=-1) / (np.linalg.norm(w, axis=-1) * np.linalg.norm(w0, axis=-1))  # [F]
    moved = float(np.mean(cos < MOVED_COS))
    l0 = metrics.get("heldout_l0")
    l0 = float(metrics["l0"] if l0 is None else l0)
    lo, hi = l0_target
    d_in = sae.cfg.d_in
    problems = []
    if l0 >= d_in:
        problems.append(f"L0 {l0:.1f} >= d_in {d_in}: more active latents than input dimensions")
    if not lo <= l0 <= hi:
        problems.append(f"L0 {l0:.1f} is outside the target [{lo:g}, {hi:g}]")
    if moved < MOVED_NEEDED:
        problems.append(f"only {moved:.0%} of decoder rows moved from their initialisation (cosine < {MOVED_COS:g}; "
                        f"need {MOVED_NEEDED:.0%}): the SAE is still close to its random start")
    fvu = metrics.get("heldout_fvu")
    return SAEHealth(l0=l0, dead_fraction=float(metrics["dead_frac"]), cos_to_init_median=float(np.median(cos)),
                     moved_fraction=moved, heldout_fvu=None if fvu is None else float(fvu),
                     healthy=not problems, problems=tuple(problems))
