"""Next-token cross-entropy on the model's softcapped logits, one mean per adapter.

Convention (lgeo_jax.data): `loss_mask[t] == 1` means token t is a target, predicted from the logits at
position t - 1. Each adapter's loss is the mean over the batch's target tokens (Hugging Face's
`labels`-based loss), so summing the per-adapter losses gives every adapter exactly its own gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def token_losses(logits: Float[Array, "A B T V"], input_ids: Int[Array, "B T"],
                 loss_mask: Int[Array, "B T"]) -> tuple[Float[Array, "A B S"], Float[Array, "B S"]]:
    """Per-token cross-entropy [A, B, T-1] (float32) and the target weights [B, T-1] (1 = target)."""
    logits = logits[:, :, :-1].astype(jnp.float32)  # [A, B, S]  S = T - 1 predicting positions 1..T-1
    targets = input_ids[:, 1:]  # [B, S]
    weights = loss_mask[:, 1:].astype(jnp.float32)  # [B, S]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [A, B, S]
    target_logit = jnp.take_along_axis(logits, jnp.broadcast_to(targets[None, :, :, None],
                                                                logits.shape[:3] + (1,)), axis=-1)[..., 0]
    return log_z - target_logit, weights  # [A, B, S], [B, S]


def next_token_loss(logits: Float[Array, "A B T V"], input_ids: Int[Array, "B T"],
                    loss_mask: Int[Array, "B T"]) -> Float[Array, " A"]:
    """Mean cross-entropy over the target tokens, per adapter; 0 for a batch without targets."""
    nll, weights = token_losses(logits, input_ids, loss_mask)
    total = jnp.einsum("ABS,BS->A", nll, weights)  # [A]
    return total / jnp.maximum(weights.sum(), 1.0)
