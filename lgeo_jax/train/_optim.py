"""The AdamW chain for LoRA training (schedules: `lgeo_jax.optim`).

Gradient clipping is per adapter: when several adapters train as one stack, clipping their joint global
norm would couple them, so each adapter's factors are clipped by that adapter's own global norm (what
Hugging Face's Trainer does for each run on its own). Adam and weight decay are elementwise, so a stacked
run takes the same steps as separate runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lgeo_jax.optim import lr_schedule
from lgeo_jax.sharding import replicated
from lgeo_jax.train._config import TrainConfig


def per_adapter_norm(tree, axis: int = 1) -> jax.Array:
    """Global gradient norm of each adapter: [n]."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.moveaxis(g, axis, 0).reshape(g.shape[axis], -1) ** 2, axis=1) for g in leaves))


def clip_per_adapter(max_norm: float, axis: int = 1) -> optax.GradientTransformation:
    """Scales each adapter's gradients (index `axis` of every leaf) to global norm <= max_norm."""

    def update(updates, state, params=None):
        norm = per_adapter_norm(updates, axis)  # [n]
        factor = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, 1e-30))  # [n]

        def scale(g):
            shape = [1] * g.ndim
            shape[axis] = g.shape[axis]
            return g * factor.reshape(shape).astype(g.dtype)

        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lora_optimizer(train: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Per-adapter clipping, then AdamW (torch defaults b=(0.9, 0.999), eps=1e-8) on the schedule."""
    schedule = lr_schedule(train.lr, train.schedule, train.warmup(total_steps), total_steps)
    parts = [clip_per_adapter(train.max_grad_norm)] if train.max_grad_norm is not None else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train.weight_decay))
    return optax.chain(*parts)


def init_on_mesh(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> tuple[Any, Any]:
    """`tx.init(params)` with every per-parameter leaf (Adam's moments) sharded like its parameter and the
    rest (step counts) replicated on `mesh`; returns (state, its shardings) so a step can keep them so."""
    shardings = jax.tree.map(lambda p: p.sharding, params)
    state_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
                                            transform_non_params=lambda _: replicated(mesh))
    return jax.jit(tx.init, out_shardings=state_shardings)(params), state_shardings
