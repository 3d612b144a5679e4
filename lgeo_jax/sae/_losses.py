"""Training losses of the four architectures, in SAE units (input already divided by the RMS scale).

Every loss starts from the squared error **summed over d** and averaged over tokens (SAELens'
``mse_loss(...).sum(-1).mean()``) and adds the architecture's own term, written after SAELens 6
(``sae_lens/saes/{standard,topk,batchtopk,jumprelu}_sae.py``), whose training loss it equals for the same
parameters, batch and dead-latent mask (tests/test_sae_losses.py):

- ReLU: ``l1 * mean_tokens sum_i f_i`` (``f_i ||W_dec_i||`` with `Sparsity.DECODER_NORM`; with unit decoder
  rows the two are SAELens' "standard" L1 term).
- TopK / BatchTopK: no penalty (k sets the sparsity) but AuxK: the top ``d // 2`` *dead* latents'
  pre-activations (no ReLU) decode, without b_dec, the detached residual ``x - x_hat``; the squared error of
  that, times ``auxk_coeff * min(n_dead / (d // 2), 1)``. BatchTopK keeps the ``k * batch`` largest ReLU
  activations of the whole batch.
- JumpReLU: ``f = pre * (pre > threshold)``; the threshold learns through the straight-through estimator
  with a rectangle kernel of width ``bandwidth`` (DeepMind's / SAELens' "step" mode; the encoder gets no STE
  gradient), and the penalty is ``l0_coeff * mean_tokens sum_i step(pre_i - threshold_i)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from lgeo_jax.sae._config import Arch, SAEConfig, SAETrainConfig, Sparsity
from lgeo_jax.sae._models import Params, activate, decode, pre_activations


def _rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: Float[Array, "B F"], threshold: Float[Array, " F"], bandwidth: float) -> Float[Array, "B F"]:
    """``pre * (pre > threshold)``; d/dpre is the gate, d/dthreshold the straight-through estimate
    ``-(threshold / bandwidth) * rect((pre - threshold) / bandwidth)`` summed over tokens."""
    return jnp.where(pre > threshold, pre, 0.0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    ste = threshold / bandwidth * _rectangle((pre - threshold) / bandwidth) * g  # [B, F]
    return jnp.where(pre > threshold, g, 0.0), -jnp.sum(ste, axis=0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre: Float[Array, "B F"], threshold: Float[Array, " F"], bandwidth: float) -> Float[Array, "B F"]:
    """``pre > threshold`` as 0/1; no gradient to ``pre``, the straight-through estimate
    ``-(1 / bandwidth) * rect((pre - threshold) / bandwidth)`` (summed over tokens) to the threshold."""
    return (pre > threshold).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    return heaviside(pre, threshold, bandwidth), (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    ste = _rectangle((pre - threshold) / bandwidth) * g / bandwidth  # [B, F]
    return jnp.zeros_like(pre), -jnp.sum(ste, axis=0)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def batch_topk(pre: Float[Array, "B F"], k: int, weight: Float[Array, " F"] | None = None) -> Float[Array, "B F"]:
    """The ``k * B`` largest ReLU activations of the whole batch kept, the rest zeroed (SAELens BatchTopK);
    with ``weight``, ranked by ``activation * weight`` (the crosscoder's decoder-norm sums) but kept unscaled."""
    acts = jax.nn.relu(pre)
    scored = (acts if weight is None else acts * weight).reshape(-1)  # [B * F]
    _, idx = jax.lax.top_k(scored, k * pre.shape[0])
    keep = jnp.zeros(scored.shape, bool).at[idx].set(True).reshape(acts.shape)
    return jnp.where(keep, acts, 0.0)


def batch_metrics(x: Float[Array, "B D"], x_hat: Float[Array, "B D"], f: Float[Array, "B F"],
                  score: Float[Array, "B F"] | None = None) -> dict[str, jax.Array]:
    """What every trainer logs of one batch: squared error summed over d and averaged over tokens (`mse`, the
    loss's reconstruction term), L0, FVU, which latents fired, and the smallest kept ``score`` (default f:
    BatchTopK's running threshold follows it)."""
    sq_err = jnp.sum((x_hat - x) ** 2, axis=-1)  # [B]
    active = f > 0  # [B, F]
    score = f if score is None else score
    return {"mse": jnp.mean(sq_err), "l0": jnp.mean(jnp.sum(active, axis=-1)),
            "fvu": jnp.sum(sq_err) / jnp.sum((x - jnp.mean(x, axis=0)) ** 2), "fired": jnp.any(active, axis=0),
            "min_active": jnp.min(jnp.where(active, score, jnp.inf))}


def auxk_loss(pre: Float[Array, "B F"], x: Float[Array, "B D"], x_hat: Float[Array, "B D"],
              w_dec: Float[Array, "F D"], dead: Bool[Array, " F"]) -> jax.Array:
    """AuxK (Gao et al. 2024, Appendix A.2, as SAELens computes it) before its coefficient: dead latents
    reconstruct the residual; scaled down by ``n_dead / (d // 2)`` when few latents are dead (0 when none)."""
    d, f = x.shape[-1], pre.shape[-1]
    k_aux = d // 2
    n_dead = jnp.sum(dead)
    scale = jnp.minimum(n_dead / k_aux, 1.0)
    # top min(k_aux, n_dead) dead latents: a static top-k over the masked pre-activations, where the -inf
    # picks beyond n_dead (live latents) are zeroed
    values, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(k_aux, f))  # [B, K]
    values = jnp.where(jnp.isfinite(values), values, 0.0)
    acts = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(values)  # [B, F]
    residual = jax.lax.stop_gradient(x - x_hat)  # [B, D]
    recon = jnp.einsum("bf,fd->bd", acts, w_dec)  # [B, D]
    return scale * jnp.mean(jnp.sum((recon - residual) ** 2, axis=-1))


def training_loss(params: Params, x: Float[Array, "B D"], l1: jax.Array, dead: Bool[Array, " F"],
                  cfg: SAEConfig, train_cfg: SAETrainConfig, with_auxk: bool = True) -> tuple[jax.Array, dict]:
    """The loss of one SAE on one batch (``x`` in SAE units) and its parts; ``l1`` is the (ramped) ReLU
    coefficient, ``dead`` the latents AuxK treats as dead. ``penalty`` in the parts is the architecture's term
    before its coefficient (L1, L0 or AuxK). ``with_auxk=False`` leaves AuxK out: exact when no latent is
    dead (the term and its gradient are then 0), and saves its top-k and decoder pass."""
    arch = cfg.architecture
    pre = pre_activations(params, x, cfg, train_cfg.low_precision)  # [B, F]
    if arch is Arch.JUMPRELU:
        f = jumprelu(pre, params["threshold"], train_cfg.jumprelu_bandwidth)
    elif arch is Arch.BATCHTOPK:
        f = batch_topk(pre, cfg.k)
    else:
        f = activate(params, pre, cfg)  # ReLU and TopK train as they run
    x_hat = decode(params, f, train_cfg.low_precision)  # [B, D]
    metrics = batch_metrics(x, x_hat, f)
    if arch is Arch.RELU:
        weighted = f * jnp.linalg.norm(params["W_dec"], axis=-1) if train_cfg.sparsity is Sparsity.DECODER_NORM else f
        penalty = jnp.mean(jnp.sum(weighted, axis=-1))
        sparsity = l1 * penalty
    elif arch is Arch.JUMPRELU:
        penalty = jnp.mean(jnp.sum(heaviside(pre, params["threshold"], train_cfg.jumprelu_bandwidth), axis=-1))
        sparsity = train_cfg.l0_coeff * penalty
    elif with_auxk:
        penalty = auxk_loss(pre, x, x_hat, params["W_dec"], dead)
        sparsity = train_cfg.auxk_coeff * penalty
    else:
        penalty = sparsity = jnp.zeros((), jnp.float32)
    return metrics["mse"] + sparsity, {**metrics, "penalty": penalty}
