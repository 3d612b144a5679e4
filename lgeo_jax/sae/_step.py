"""One SAE's loss, optimizer step and held-out metrics; `jax.vmap` adds the SAE axis in `_train`.

Loss convention (as SAELens states its own): ``mse`` is the squared error **summed over d** and averaged
over tokens, in SAE units (input divided by the RMS scale, so ``||x||^2 ~ d`` per token). The ReLU penalty
is ``l1 * mean_tokens sum_latents f_i`` with unit-norm decoder rows (default, `Sparsity.UNIT_DECODER`) or
``l1 * mean_tokens sum_latents f_i ||W_dec_i||`` with a free decoder (`Sparsity.DECODER_NORM`). TopK has no
penalty (its sparsity is k). ``loss = mse + l1_effective * penalty``, where ``l1_effective`` ramps linearly
from 0 over ``l1_warmup_steps``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from lgeo_jax.optim import lr_schedule
from lgeo_jax.sae._config import Arch, SAEConfig, SAETrainConfig, Sparsity
from lgeo_jax.sae._models import Params, activate, decode, pre_activations


class SAEState(NamedTuple):
    """Everything that changes during training, per SAE (a leading S axis once stacked)."""

    params: Params
    opt_state: optax.OptState
    steps_since_fired: jax.Array  # [F] int32: optimizer steps since each latent was last active
    scale: jax.Array  # [] RMS scale s of this SAE's data (fixed after init, kept for exact resume)


def make_optimizer(cfg: SAETrainConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(cfg.lr, cfg.lr_schedule, cfg.lr_warmup_steps, total_steps, cfg.decay_steps(total_steps))
    return optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2)


def l1_ramp(cfg: SAETrainConfig, step: jax.Array) -> jax.Array:
    """Multiplier in [0, 1] on the L1 coefficient at ``step`` (0-based)."""
    if cfg.l1_warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (step + 1) / cfg.l1_warmup_steps).astype(jnp.float32)


def penalty(params: Params, f: Float[Array, "B F"], cfg: SAEConfig, sparsity: Sparsity) -> jax.Array:
    """Sparsity penalty per the loss convention above (0 for TopK)."""
    if cfg.architecture is Arch.TOPK:
        return jnp.zeros((), jnp.float32)
    if sparsity is Sparsity.DECODER_NORM:
        f = f * jnp.linalg.norm(params["W_dec"], axis=-1)  # [B, F]
    return jnp.mean(jnp.sum(f, axis=-1))


def loss_fn(params: Params, x: Float[Array, "B D"], l1: jax.Array, cfg: SAEConfig, sparsity: Sparsity):
    """Training loss and its parts; ``x`` in SAE units."""
    f = activate(params, pre_activations(params, x, cfg), cfg)  # [B, F]
    x_hat = decode(params, f)  # [B, D]
    sq_err = jnp.sum((x_hat - x) ** 2, axis=-1)  # [B]
    mse = jnp.mean(sq_err)
    pen = penalty(params, f, cfg, sparsity)
    var = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    aux = {"mse": mse, "penalty": pen, "l0": jnp.mean(jnp.sum(f > 0, axis=-1)),
           "fvu": jnp.sum(sq_err) / var, "fired": jnp.any(f > 0, axis=0)}
    return mse + l1 * pen, aux


def train_step(state: SAEState, x: Float[Array, "B D"], l1: jax.Array, step: jax.Array,
               sae_cfg: SAEConfig, train_cfg: SAETrainConfig, optimizer: optax.GradientTransformation):
    """One Adam step for one SAE; ``x`` is in original units and divided by the stored scale here."""
    x = x / state.scale
    l1_eff = l1 * l1_ramp(train_cfg, step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, l1_eff, sae_cfg,
                                                                   train_cfg.sparsity)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if sae_cfg.architecture is Arch.RELU and train_cfg.sparsity is Sparsity.UNIT_DECODER:
        params["W_dec"] = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=-1, keepdims=True)
    fired = aux.pop("fired")  # [F]
    steps_since = jnp.where(fired, 0, state.steps_since_fired + 1)
    metrics = {"loss": loss, "l1": l1_eff, **aux}
    return SAEState(params, opt_state, steps_since, state.scale), metrics


def held_out_metrics(params: Params, scale: jax.Array, x: Float[Array, "N D"], cfg: SAEConfig) -> dict:
    """Reconstruction on held-out rows, in original units (docs/conventions.md definitions)."""
    f = activate(params, pre_activations(params, x / scale, cfg), cfg)  # [N, F]
    x_hat = decode(params, f) * scale  # [N, D]
    err = jnp.sum((x - x_hat) ** 2, axis=-1)  # [N]
    norm2 = jnp.sum(x**2, axis=-1)  # [N]
    var = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    return {"heldout_rel_l2": jnp.mean(jnp.sqrt(err / norm2)),
            "heldout_rel_l2_pooled": jnp.sqrt(err.sum() / norm2.sum()), "heldout_fvu": err.sum() / var,
            "heldout_l0": jnp.mean(jnp.sum(f > 0, axis=-1))}


def geometric_median(x: Float[Array, "N D"], iters: int = 64, eps: float = 1e-6) -> Float[Array, " D"]:
    """Weiszfeld iterations from the mean: the point minimising the summed Euclidean distance to the rows."""

    def body(_, y):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)  # [N]
        return jnp.einsum("n,nd->d", w, x) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))
