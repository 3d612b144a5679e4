"""A crosscoder between two streams (base, adapted) as pure functions of a parameter dict, its training loss
and its optimizer step; `jax.vmap` adds the crosscoder axis in `_train`.

Parameters use the SAE layout over the concatenated input ``x = [h_base; h_adapted]`` (``[B, 2D]``), so the
SAE package's AuxK and training-health code read them unchanged: ``W_enc [2D, F]``, ``b_enc [F]``,
``W_dec [F, 2D]`` (row j = ``[d_j^base; d_j^adapted]``, viewed as ``[F, 2, D]``), ``b_dec [2D]`` and, for
BatchTopK, ``threshold [F]``. The encoder sees x itself (no b_dec subtraction, as crosscoder_learning), the
decoder is unconstrained (the sparsity term weights each latent by the sum of its two decoder norms, so
shrinking f and growing a decoder does not pay). Einsum letters: B tokens, E = 2D, F latents. Units: the
crosscoder sees ``x / s`` with one RMS scale s per crosscoder (docs/conventions.md), both streams divided by
the same s so their decoder norms compare.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float

from lgeo_jax.crosscoder._config import CrossArch, CrosscoderConfig
from lgeo_jax.optim import lr_schedule
from lgeo_jax.sae import auxk_loss, batch_metrics, batch_topk

Params = dict[str, jax.Array]


def init_params(key: jax.Array, d_in: int, cfg: CrosscoderConfig) -> Params:
    """Random decoder rows of unit norm over both streams (each half norm ~1/sqrt 2), tied encoder, zero biases."""
    w_dec = jax.random.normal(key, (cfg.width, 2 * d_in), jnp.float32)  # [F, E]
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    params = {"W_enc": w_dec.T, "b_enc": jnp.zeros(cfg.width, jnp.float32), "W_dec": w_dec,
              "b_dec": jnp.zeros(2 * d_in, jnp.float32)}
    if cfg.architecture is CrossArch.BATCHTOPK:
        params["threshold"] = jnp.zeros(cfg.width, jnp.float32)
    return params


def decoder_norms(w_dec: Float[Array, "F E"]) -> Float[Array, "F 2"]:
    """Per latent, the norms of its base and adapted decoder directions."""
    f, e = w_dec.shape
    return jnp.linalg.norm(w_dec.reshape(f, 2, e // 2), axis=-1)  # [F, 2]


def pre_activations(params: Params, x: Float[Array, "B E"]) -> Float[Array, "B F"]:
    return jnp.einsum("be,ef->bf", x, params["W_enc"]) + params["b_enc"]  # [B, F]


def encode(params: Params, x: Float[Array, "B E"], cfg: CrosscoderConfig) -> Float[Array, "B F"]:
    """Inference activations (x in crosscoder units): ReLU, or BatchTopK's learnt gate on ``f_j * norm-sum_j``."""
    f = jax.nn.relu(pre_activations(params, x))  # [B, F]
    if cfg.architecture is CrossArch.BATCHTOPK:
        weight = jnp.sum(decoder_norms(params["W_dec"]), axis=-1)  # [F]
        f = jnp.where(f * weight > params["threshold"], f, 0.0)
    return f


def decode(params: Params, f: Float[Array, "B F"]) -> Float[Array, "B E"]:
    return jnp.einsum("bf,fe->be", f, params["W_dec"]) + params["b_dec"]  # [B, E]


def training_loss(params: Params, x: Float[Array, "B E"], dead: Bool[Array, " F"], cfg: CrosscoderConfig,
                  with_auxk: bool = True) -> tuple[jax.Array, dict]:
    """Squared error summed over both streams' d, averaged over tokens, plus the sparsity term (L1: decoder-
    norm-sum weighted L1; BatchTopK: AuxK of the dead latents, `lgeo_jax.sae`'s, on the concatenation)."""
    pre = pre_activations(params, x)  # [B, F]
    weight = jnp.sum(decoder_norms(params["W_dec"]), axis=-1)  # [F]
    f = batch_topk(pre, cfg.k, weight) if cfg.architecture is CrossArch.BATCHTOPK else jax.nn.relu(pre)
    x_hat = decode(params, f)  # [B, E]
    metrics = batch_metrics(x, x_hat, f, f * weight)
    if cfg.architecture is CrossArch.L1:
        penalty = jnp.mean(jnp.sum(f * weight, axis=-1))
        sparsity = cfg.l1 * penalty
    elif with_auxk:
        penalty = auxk_loss(pre, x, x_hat, params["W_dec"], dead)
        sparsity = cfg.auxk_coeff * penalty
    else:
        penalty = sparsity = jnp.zeros((), jnp.float32)
    return metrics["mse"] + sparsity, {**metrics, "penalty": penalty}


class CrossState(NamedTuple):
    """Everything that changes during training, per crosscoder (a leading C axis once stacked)."""

    params: Params
    opt_state: optax.OptState
    steps_since_fired: jax.Array  # [F] int32
    scale: jax.Array  # [] RMS scale s (fixed after init)


def make_optimizer(cfg: CrosscoderConfig) -> optax.GradientTransformation:
    schedule = lr_schedule(cfg.lr, cfg.lr_schedule, cfg.lr_warmup_steps, cfg.steps, cfg.decay_steps())
    return optax.adam(schedule)


def train_step(state: CrossState, x: Float[Array, "B E"], cfg: CrosscoderConfig,
               optimizer: optax.GradientTransformation, with_auxk: bool = True) -> tuple[CrossState, dict]:
    """One Adam step; ``x`` in original units. BatchTopK's inference threshold follows the smallest kept
    norm-weighted activation (a moving average, as the SAE package's BatchTopK)."""
    x = x / state.scale
    dead = state.steps_since_fired >= cfg.dead_window_steps()  # [F]
    (loss, aux), grads = jax.value_and_grad(training_loss, has_aux=True)(state.params, x, dead, cfg, with_auxk)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    min_active = aux.pop("min_active")
    if cfg.architecture is CrossArch.BATCHTOPK:  # (the loss never reads it, so Adam left it unchanged)
        lr = cfg.threshold_lr
        params["threshold"] = jnp.where(jnp.isfinite(min_active),
                                        (1 - lr) * params["threshold"] + lr * min_active, params["threshold"])
    fired = aux.pop("fired")
    steps_since = jnp.where(fired, 0, state.steps_since_fired + 1)
    return CrossState(params, opt_state, steps_since, state.scale), {"loss": loss, **aux}


def held_out_metrics(params: Params, scale: jax.Array, x: Float[Array, "N E"], cfg: CrosscoderConfig) -> dict:
    """Held-out reconstruction of each stream in original units (docs/conventions.md definitions)."""
    f = encode(params, x / scale, cfg)  # [N, F]
    x_hat = decode(params, f) * scale  # [N, E]
    n, e = x.shape
    err = jnp.sum(((x - x_hat) ** 2).reshape(n, 2, e // 2), axis=-1)  # [N, 2]
    cent = jnp.sum(((x - jnp.mean(x, axis=0)) ** 2).reshape(n, 2, e // 2), axis=-1)  # [N, 2]
    fvu = err.sum(0) / cent.sum(0)  # [2]
    return {"heldout_fvu": jnp.sum(err) / jnp.sum(cent), "heldout_fvu_base": fvu[0], "heldout_fvu_adapted": fvu[1],
            "heldout_l0": jnp.mean(jnp.sum(f > 0, axis=-1))}
