"""The `crosscoder` section: crosscoders between the base and adapted streams (one encoder over
``[h_base; h_adapted]``, one decoder per stream), how they train and how their latents are classified."""

from __future__ import annotations

import enum
from collections.abc import Iterator

from lgeo_jax.config import (
    Problem,
    Section,
    at_least,
    cross_check,
    field,
    greater,
    in_range,
    nonempty_distinct,
    section,
)
from lgeo_jax.optim import Schedule


class CrossArch(enum.StrEnum):
    """``batchtopk``: the ``k * batch`` largest norm-weighted activations ``f_j (||d_j^base|| + ||d_j^adapted||)``
    of the batch kept, AuxK for dead latents (crosscoder_learning's BatchTopKCrossCoder); runs at inference as a
    gate at the threshold learnt during training. ``l1``: ReLU with the penalty
    ``l1 * mean_tokens sum_j f_j (||d_j^base|| + ||d_j^adapted||)`` (Anthropic's crosscoder loss)."""

    BATCHTOPK = "batchtopk"
    L1 = "l1"


def _fraction(value: float) -> Iterator[tuple[str, str]]:
    if not 0 < value <= 1:
        yield "", f"expected a fraction in (0, 1], got {value:g}"


@section
class CrosscoderConfig(Section):
    """Crosscoders on (h_base, h_base + delta) pairs of every adapter x layer of the corpus, all in one job.

    A latent's decoder-norm difference ``norm_diff = ((||d_a|| - ||d_b||) / max(||d_a||, ||d_b||) + 1) / 2``
    (Minder et al. 2025) is 0 for a base-only latent, 1 for an adapter-only one; latents below
    `base_only_max` are base-only, above `adapter_only_min` adapter-only, inside `shared_range` shared.
    """

    enabled: bool = field(False)
    architecture: CrossArch = field(CrossArch.BATCHTOPK)
    width: int = field(16_384, check=greater(0))
    k: int | None = field(100, check=greater(0))  # BatchTopK: active latents per token on average
    l1: float | None = field(None, check=greater(0))  # the L1 variant's coefficient
    auxk_coeff: float = field(1 / 32, check=at_least(0))  # crosscoder_learning's default
    threshold_lr: float = field(0.01, check=in_range(0.0, 1.0))  # BatchTopK inference threshold's moving average
    lr: float = field(1e-4, check=greater(0))
    lr_warmup_steps: int = field(0, check=at_least(0))
    lr_schedule: Schedule = field(Schedule.CONSTANT)
    lr_decay_fraction: float = field(0.2, check=in_range(0.0, 1.0))
    batch_size: int = field(512, check=greater(0))
    steps: int = field(2000, check=greater(0))
    dead_window_fraction: float = field(0.1, check=_fraction)
    eval_rows: int = field(4096, check=at_least(0))
    seeds: tuple[int, ...] = field((0,), check=nonempty_distinct(at_least(0)))
    base_only_max: float = field(0.1, check=in_range(0.0, 1.0))
    adapter_only_min: float = field(0.9, check=in_range(0.0, 1.0))
    shared_range: tuple[float, float] = field((0.4, 0.6))
    log_every: int = field(50, check=greater(0), affects_results=False)
    checkpoint_every: int = field(1000, check=greater(0), affects_results=False)
    keep_checkpoints: int = field(2, check=greater(0), affects_results=False)

    def decay_steps(self) -> int:
        return int(round(self.lr_decay_fraction * self.steps))

    def dead_window_steps(self) -> int:
        return max(1, int(round(self.dead_window_fraction * self.steps)))

    @cross_check("architecture", "k", "l1")
    def _per_architecture(self) -> Iterator[Problem]:
        if self.architecture is CrossArch.BATCHTOPK:
            if self.k is None:
                yield Problem("k", "required for architecture 'batchtopk' (active latents per token)")
            if self.l1 is not None:
                yield Problem("l1", "not used by architecture 'batchtopk' (k sets the sparsity); remove it")
        else:
            if self.l1 is None:
                yield Problem("l1", "required for architecture 'l1' (the decoder-norm-weighted L1 coefficient)")
            if self.k is not None:
                yield Problem("k", "only used with architecture 'batchtopk'; set it to null")

    @cross_check("width", "k")
    def _k_fits(self) -> Iterator[Problem]:
        if self.k is not None and self.k > self.width:
            yield Problem("k", f"{self.k} exceeds the crosscoder width {self.width}")

    @cross_check("base_only_max", "adapter_only_min", "shared_range")
    def _classes(self) -> Iterator[Problem]:
        lo, hi = self.shared_range
        if not self.base_only_max <= lo <= hi <= self.adapter_only_min:
            yield Problem("shared_range", f"need base_only_max <= shared low <= shared high <= adapter_only_min, got "
                                          f"{self.base_only_max:g}, [{lo:g}, {hi:g}], {self.adapter_only_min:g}")
