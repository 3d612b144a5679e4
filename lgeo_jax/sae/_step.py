"""One SAE's optimizer step, dead-latent resampling and held-out metrics; `jax.vmap` adds the SAE axis in
`_train`. The losses themselves are in `_losses` (the loss convention is stated there).

After the gradient, with unit-norm decoder rows (`SAETrainConfig.unit_decoder`), the component of each
decoder row's gradient along the row is removed (it would only change the row's norm, which the projection
undoes) and after the Adam update the rows are renormalised, as SAELens trained its unit-norm decoders
(``remove_gradient_parallel_to_decoder_directions`` + ``set_decoder_norm_to_unit_norm``) and Gemma Scope
trained its JumpReLU SAEs. JumpReLU thresholds are then projected to >= 0, and BatchTopK's threshold
follows the smallest kept activation (an exponential moving average, as SAELens' ``topk_threshold``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from lgeo_jax.optim import lr_schedule
from lgeo_jax.sae._config import Arch, SAEConfig, SAETrainConfig
from lgeo_jax.sae._losses import training_loss
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


def remove_parallel(grad: Float[Array, "F D"], w: Float[Array, "F D"]) -> Float[Array, "F D"]:
    """``grad`` minus, per row, its component along that row of ``w``."""
    along = jnp.sum(grad * w, axis=-1, keepdims=True) / jnp.sum(w * w, axis=-1, keepdims=True)  # [F, 1]
    return grad - along * w


def unit_rows(w: Float[Array, "F D"]) -> Float[Array, "F D"]:
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def loss_and_grads(params: Params, x: Float[Array, "B D"], l1: jax.Array, dead: Bool[Array, " F"],
                   sae_cfg: SAEConfig, train_cfg: SAETrainConfig, with_auxk: bool = True):
    """Loss, its parts and the gradients the optimizer sees (the decoder's row-parallel part removed when
    rows are held at unit norm); ``x`` in SAE units."""
    (loss, aux), grads = jax.value_and_grad(training_loss, has_aux=True)(params, x, l1, dead, sae_cfg, train_cfg,
                                                                         with_auxk)
    if train_cfg.unit_decoder:
        grads = {**grads, "W_dec": remove_parallel(grads["W_dec"], params["W_dec"])}
    return loss, aux, grads


def train_step(state: SAEState, x: Float[Array, "B D"], l1: jax.Array, step: jax.Array,
               sae_cfg: SAEConfig, train_cfg: SAETrainConfig, optimizer: optax.GradientTransformation,
               dead_steps: int, with_auxk: bool = True):
    """One Adam step for one SAE; ``x`` is in original units and divided by the stored scale here. A latent
    silent for ``dead_steps`` steps is dead (AuxK's mask; ``with_auxk=False`` only when none is)."""
    x = x / state.scale
    l1_eff = l1 * l1_ramp(train_cfg, step)
    dead = state.steps_since_fired >= dead_steps  # [F]
    loss, aux, grads = loss_and_grads(state.params, x, l1_eff, dead, sae_cfg, train_cfg, with_auxk)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if train_cfg.unit_decoder:
        params["W_dec"] = unit_rows(params["W_dec"])
    min_active = aux.pop("min_active")
    if sae_cfg.architecture is Arch.JUMPRELU:
        params["threshold"] = jnp.maximum(params["threshold"], 0.0)
    elif sae_cfg.architecture is Arch.BATCHTOPK:  # (the loss never reads it, so Adam left it unchanged)
        lr = train_cfg.batchtopk_threshold_lr
        params["threshold"] = jnp.where(jnp.isfinite(min_active),
                                        (1 - lr) * params["threshold"] + lr * min_active, params["threshold"])
    fired = aux.pop("fired")  # [F]
    steps_since = jnp.where(fired, 0, state.steps_since_fired + 1)
    metrics = {"loss": loss, "l1": l1_eff, **aux}
    return SAEState(params, opt_state, steps_since, state.scale), metrics


def _zero_latents(tree: Params, mask: Bool[Array, " F"]) -> Params:
    """``tree`` (params-shaped) with the encoder columns, encoder bias and decoder rows of ``mask`` zeroed."""
    return {**tree, "W_enc": jnp.where(mask[None, :], 0.0, tree["W_enc"]),
            "b_enc": jnp.where(mask, 0.0, tree["b_enc"]), "W_dec": jnp.where(mask[:, None], 0.0, tree["W_dec"])}


def resample_dead(state: SAEState, x: Float[Array, "B D"], key: jax.Array, sae_cfg: SAEConfig,
                  dead_steps: int) -> SAEState:
    """Re-initialise the dead latents of a ReLU SAE (Anthropic, "Towards Monosemanticity", 2023): each gets
    the direction of a batch input drawn with probability proportional to its squared reconstruction loss
    (minus b_dec, unit norm) as its decoder row and, scaled to 0.2 x the live latents' mean encoder norm, as its
    encoder column; zero encoder bias and Adam moments, and a fresh dead-window count. ``x`` in original units."""
    x = x / state.scale
    p = state.params
    dead = state.steps_since_fired >= dead_steps  # [F]
    err = jnp.sum((decode(p, activate(p, pre_activations(p, x, sae_cfg), sae_cfg)) - x) ** 2, axis=-1)  # [B]
    weight = err**2 + 1e-30  # never all zero: a perfect batch still gives a valid distribution
    pick = jax.random.choice(key, x.shape[0], (sae_cfg.d_sae,), p=weight / jnp.sum(weight))  # [F]
    dirs = unit_rows(x[pick] - p["b_dec"])  # [F, D]
    enc_norm = jnp.linalg.norm(p["W_enc"], axis=0)  # [F]
    live_norm = jnp.where(jnp.any(~dead), jnp.sum(jnp.where(dead, 0.0, enc_norm)) / jnp.maximum(jnp.sum(~dead), 1),
                          1.0)
    params = {**p, "W_dec": jnp.where(dead[:, None], dirs, p["W_dec"]),
              "W_enc": jnp.where(dead[None, :], dirs.T * (0.2 * live_norm), p["W_enc"]),
              "b_enc": jnp.where(dead, 0.0, p["b_enc"])}

    def reset(node):
        if isinstance(node, optax.ScaleByAdamState):
            return optax.ScaleByAdamState(count=node.count, mu=_zero_latents(node.mu, dead),
                                          nu=_zero_latents(node.nu, dead))
        return node

    opt_state = jax.tree.map(reset, state.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
    return SAEState(params, opt_state, jnp.where(dead, 0, state.steps_since_fired), state.scale)


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
