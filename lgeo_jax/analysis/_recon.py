"""Reconstruction error sums over a token stream (Tables 5-7), both definitions of docs/conventions.md.

    rel_l2        = mean_t ||x - x_hat|| / ||x||                 (tokens with ||x|| = 0 are skipped, counted)
    rel_l2_pooled = sqrt(sum ||x - x_hat||^2 / sum ||x||^2)
    fvu           = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2

Batches arrive from the device in float32; every sum is kept on the host in float64. The total
variance around the mean is merged batch by batch with the exact pairwise update (Chan et al. 1979),
never as sum ||x||^2 - n ||mean||^2, which cancels catastrophically when the mean dominates (late-layer
residuals, deltas with a large common offset).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Float

ERROR_NAMES = ("rel_l2", "rel_l2_pooled", "fvu")


@dataclasses.dataclass
class ErrorSums:
    """Running sums for the reconstruction errors of one (SAE, token stream) pair."""

    n: int = 0
    n_ratio: int = 0  # tokens with ||x|| > 0 (the mean-of-ratios is over these)
    ratio_sum: float = 0.0
    err_sq: float = 0.0
    norm_sq: float = 0.0
    mean: np.ndarray | None = None  # [D] running mean of x
    centred_sq: float = 0.0  # sum ||x - mean||^2 so far

    def add(self, x: Float[np.ndarray, "B D"], x_hat: Float[np.ndarray, "B D"]) -> ErrorSums:
        """Adds a batch of targets and reconstructions (same shape); returns self."""
        x = np.asarray(x, np.float64)
        x_hat = np.asarray(x_hat, np.float64)
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"ErrorSums.add: x {x.shape} and x_hat {x_hat.shape} must be equal [tokens, d]")
        if x.shape[0] == 0:
            return self
        err = np.einsum("bd,bd->b", x - x_hat, x - x_hat)  # [B]
        norm = np.einsum("bd,bd->b", x, x)  # [B]
        nonzero = norm > 0  # [B]
        self.ratio_sum += float(np.sum(np.sqrt(err[nonzero] / norm[nonzero])))
        self.n_ratio += int(nonzero.sum())
        self.err_sq += float(err.sum())
        self.norm_sq += float(norm.sum())
        batch_mean = x.mean(axis=0)  # [D]
        batch_centred = float(np.sum((x - batch_mean) ** 2))
        if self.n == 0:
            self.mean, self.centred_sq = batch_mean, batch_centred
        else:
            n_b, total = x.shape[0], self.n + x.shape[0]
            shift = batch_mean - self.mean  # [D]
            self.centred_sq += batch_centred + (self.n * n_b / total) * float(shift @ shift)
            self.mean = self.mean + shift * (n_b / total)
        self.n += x.shape[0]
        return self

    def result(self) -> dict[str, float | int | None]:
        """The three errors (None where undefined: no tokens, all-zero targets, zero variance)."""
        if self.n == 0:
            raise ValueError("ErrorSums.result: no tokens were added")
        return {
            "rel_l2": self.ratio_sum / self.n_ratio if self.n_ratio else None,
            "rel_l2_pooled": float(np.sqrt(self.err_sq / self.norm_sq)) if self.norm_sq > 0 else None,
            "fvu": self.err_sq / self.centred_sq if self.centred_sq > 0 else None,
            "n_tokens": self.n,
            "n_zero_norm": self.n - self.n_ratio,
        }


def improvement(delta_errors: dict, reference_errors: dict) -> dict[str, float | None]:
    """Table 7: 1 - E_delta / E_reference in percent, per error definition (None where undefined)."""
    out = {}
    for name in ERROR_NAMES:
        e_delta, e_ref = delta_errors.get(name), reference_errors.get(name)
        out[name] = None if e_delta is None or not e_ref else 100.0 * (1.0 - e_delta / e_ref)
    return out
