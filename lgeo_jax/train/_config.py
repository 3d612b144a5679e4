"""The `train` section: LoRA fine-tuning of every rank at once (AdamW, warmup + decay, accumulation)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from lgeo_jax.config import DType, Problem, Section, at_least, cross_check, field, greater, in_range, section
from lgeo_jax.optim import Schedule


@section
class TrainConfig(Section):
    """LoRA fine-tuning; the paper's learning rate is not legible, 2e-4 is the common PEFT choice."""

    lr: float = field(2e-4, check=greater(0))
    warmup_steps: int | None = field(None, check=at_least(0))
    warmup_fraction: float | None = field(0.03, check=in_range(0.0, 1.0, hi_open=True))
    schedule: Schedule = field(Schedule.LINEAR)
    weight_decay: float = field(0.0, check=at_least(0))
    max_grad_norm: float | None = field(1.0, check=greater(0))
    batch_size: int = field(2, check=greater(0))
    grad_accum_steps: int = field(4, check=greater(0))  # optimizer step every grad_accum_steps batches
    epochs: int = field(3, check=greater(0))
    max_steps: int | None = field(None, check=greater(0))  # optimizer steps; caps the epochs when set
    seed: int = field(42, check=at_least(0))
    compute_dtype: DType = field(DType.BFLOAT16)
    checkpoint_every: int = field(500, check=greater(0), affects_results=False)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum_steps

    def warmup(self, total_steps: int) -> int:
        """`warmup_steps` when set, else ceil(warmup_fraction * total) as Hugging Face's `warmup_ratio`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil((self.warmup_fraction or 0.0) * total_steps)

    @cross_check("warmup_steps", "warmup_fraction")
    def _warmup(self) -> Iterator[Problem]:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            yield Problem("warmup_steps", "set at most one of train.warmup_steps and train.warmup_fraction")
