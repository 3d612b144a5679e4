"""Table 8: how many dictionary features that fire on the delta also fire on h_base at the same token.

Per token t with at least one active feature on the delta (f > threshold, docs/conventions.md):
    overlap_t = |A_delta(t) & A_base(t)| / |A_delta(t)|
`overlap` averages overlap_t over those tokens; `overlap_pooled` = sum |A_delta & A_base| / sum |A_delta|.

Two nulls, computed on the same tokens:
* `chance`: if the delta's features were a random |A_delta(t)|-subset of the F features, independent of
  the base's, E[overlap_t] = |A_base(t)| / F; averaged over the same tokens (pooled: weighted by |A_delta|).
* `shuffled`: overlap of the delta's features with the base features of *another* token (the batch's
  base rows rolled by half a batch), which keeps both marginals and breaks only the token pairing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Float


@dataclasses.dataclass
class OverlapSums:
    """Running sums for Table 8 over batches of dictionary activations on delta and on h_base."""

    threshold: float = 0.0
    n: int = 0
    n_active: int = 0  # tokens with >= 1 active delta feature
    ratio_sum: float = 0.0
    shared_sum: int = 0
    delta_active_sum: int = 0
    base_active_sum: int = 0
    chance_sum: float = 0.0  # sum over active tokens of |A_base| / F
    chance_pooled_sum: float = 0.0  # sum over tokens of |A_delta| |A_base| / F
    shuffled_ratio_sum: float = 0.0
    shuffled_shared_sum: int = 0
    width: int | None = None

    def add(self, f_delta: Float[np.ndarray, "B F"], f_base: Float[np.ndarray, "B F"]) -> OverlapSums:
        """Adds one batch of feature activations of the same tokens; returns self."""
        f_delta, f_base = np.asarray(f_delta), np.asarray(f_base)
        if f_delta.shape != f_base.shape or f_delta.ndim != 2:
            raise ValueError(f"OverlapSums.add: f_delta {f_delta.shape} and f_base {f_base.shape} must be equal "
                             "[tokens, features]")
        if self.width is not None and f_delta.shape[1] != self.width:
            raise ValueError(f"OverlapSums.add: width {f_delta.shape[1]} differs from earlier batches ({self.width})")
        self.width = f_delta.shape[1]
        on_delta = f_delta > self.threshold  # [B, F]
        on_base = f_base > self.threshold  # [B, F]
        shuffled_base = np.roll(on_base, on_base.shape[0] // 2, axis=0)  # [B, F] another token's base features
        n_delta = on_delta.sum(axis=1)  # [B]
        n_base = on_base.sum(axis=1)  # [B]
        shared = (on_delta & on_base).sum(axis=1)  # [B]
        shared_shuffled = (on_delta & shuffled_base).sum(axis=1)  # [B]
        active = n_delta > 0  # [B]
        self.n += f_delta.shape[0]
        self.n_active += int(active.sum())
        self.ratio_sum += float(np.sum(shared[active] / n_delta[active]))
        self.shuffled_ratio_sum += float(np.sum(shared_shuffled[active] / n_delta[active]))
        self.shared_sum += int(shared.sum())
        self.shuffled_shared_sum += int(shared_shuffled.sum())
        self.delta_active_sum += int(n_delta.sum())
        self.base_active_sum += int(n_base.sum())
        self.chance_sum += float(np.sum(n_base[active]) / self.width)
        self.chance_pooled_sum += float(np.sum(n_delta * n_base) / self.width)
        return self

    def result(self) -> dict[str, float | int | None]:
        if self.n == 0:
            raise ValueError("OverlapSums.result: no tokens were added")
        any_active = self.n_active > 0
        return {
            "overlap": self.ratio_sum / self.n_active if any_active else None,
            "overlap_pooled": self.shared_sum / self.delta_active_sum if self.delta_active_sum else None,
            "active_delta": self.delta_active_sum / self.n,  # mean |A_delta| over all tokens
            "active_delta_when_any": self.delta_active_sum / self.n_active if any_active else None,
            "active_base": self.base_active_sum / self.n,
            "tokens": self.n,
            "tokens_with_active": self.n_active,
            "null_chance": self.chance_sum / self.n_active if any_active else None,
            "null_chance_pooled": (self.chance_pooled_sum / self.delta_active_sum if self.delta_active_sum
                                   else None),
            "null_shuffled": self.shuffled_ratio_sum / self.n_active if any_active else None,
            "null_shuffled_pooled": (self.shuffled_shared_sum / self.delta_active_sum if self.delta_active_sum
                                     else None),
        }
