"""Learning-rate schedules shared by every trainer (LoRA, SAEs, the built-in model's pretraining)."""

from __future__ import annotations

import enum

import jax.numpy as jnp
import optax


class Schedule(enum.Enum):
    """What the learning rate does after warmup: stay, fall linearly to 0, or follow a half cosine to 0."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


def lr_schedule(peak: float, schedule: Schedule, warmup: int, total_steps: int,
                decay_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup` steps, flat, then constant / linear-to-0 / cosine-to-0 over
    the last `decay_steps` steps (None: every step after warmup, as transformers'
    `get_{constant,linear,cosine}_schedule_with_warmup`; SAE trainers usually decay over the last fifth)."""
    if total_steps < 1:
        raise ValueError(f"lr_schedule: total_steps must be >= 1, got {total_steps}")
    schedule = Schedule(schedule)
    decay = total_steps - warmup if decay_steps is None else decay_steps
    decay_start = total_steps - max(decay, 1)
    warmup = min(warmup, decay_start)  # a warmup longer than the flat part would overlap the decay

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = step / max(warmup, 1)
        progress = jnp.clip((step - decay_start) / max(decay, 1), 0.0, 1.0)
        if schedule is Schedule.CONSTANT:
            after = jnp.ones_like(progress)
        elif schedule is Schedule.LINEAR:
            after = 1.0 - progress
        else:
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak * jnp.where(step < warmup, ramp, after)

    return lr
