"""Held-out evaluation of an adapter stack against its base in one pass (base = slot 0 of the stack).

Reports, per adapter: the held-out loss with and without it (the base's loss is what an untrained
adapter, B = 0, gives) and the mean L2 norm of its logit change over the held-out tokens, so a report can
show that training changed the model measurably.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lgeo_jax.data import TokenizedExample, iterate_batches, steps_per_epoch
from lgeo_jax.lora import LoraAdapters, stacked_lora
from lgeo_jax.model import Gemma2
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, mesh_context, replicated
from lgeo_jax.train._batches import TOKEN_FIELDS, batch_config, check_examples
from lgeo_jax.train._lora_trainer import merge_lora, on_mesh, put_tokens
from lgeo_jax.train._loss import token_losses


@dataclasses.dataclass(frozen=True)
class HeldoutEval:
    """base_loss: the base model's mean loss per target token; the rest per adapter, in stack order."""

    names: tuple[str, ...]
    base_loss: float
    adapter_loss: tuple[float, ...]
    logit_delta_norm: tuple[float, ...]  # mean over real tokens of ||logits_adapter - logits_base||_2
    n_target_tokens: int
    n_tokens: int

    def to_json(self) -> dict:
        return {name: {"heldout_loss_base": self.base_loss, "heldout_loss_adapter": self.adapter_loss[i],
                       "mean_logit_delta_norm": self.logit_delta_norm[i]} for i, name in enumerate(self.names)}


@functools.lru_cache(maxsize=4)
def _eval_fn(model_def, lora_def, mesh: Mesh):
    @functools.partial(jax.jit, out_shardings=replicated(mesh))  # host-readable sums on every process
    def sums(params, rest, base, input_ids, attention_mask, loss_mask):
        adapters = merge_lora(lora_def, params, rest)
        model = nnx.merge(model_def, base)
        n = len(adapters.specs) + 1
        logits = model(input_ids, attention_mask, lora=stacked_lora(adapters, with_base=True), n_adapters=n,
                       dtype=jnp.float32)  # [A, B, T, V], A = 1 + adapters
        nll, weights = token_losses(logits, input_ids, loss_mask)  # [A, B, S], [B, S]
        delta = jnp.sqrt(jnp.sum((logits[1:] - logits[:1]) ** 2, axis=-1))  # [A-1, B, T]
        real = attention_mask.astype(jnp.float32)  # [B, T]
        return jnp.einsum("ABS,BS->A", nll, weights), jnp.einsum("ABT,BT->A", delta, real)

    return sums


def evaluate_heldout(model: Gemma2, adapters: LoraAdapters, examples: Sequence[TokenizedExample], *,
                     batch_size: int = 8, mesh: Mesh | None = None,
                     rules: LogicalAxisRules = DEFAULT_RULES) -> HeldoutEval:
    """Exact token means over all of `examples` (float32 pass, sums accumulated in float64 on the host), on
    `mesh` (default: the model's) with each batch split by the `batch` rule."""
    adapters.check_model(model.config)
    check_examples(examples, model.config, what="held-out evaluation data")
    mesh, model_def, base, lora_def, params, rest = on_mesh(model, adapters, mesh, rules, jnp.float32)
    fn = _eval_fn(model_def, lora_def, mesh)
    bc = batch_config(examples, batch_size, seed=0, shuffle=False)
    loss_sum = np.zeros(len(adapters) + 1)
    delta_sum = np.zeros(len(adapters))
    n_targets = n_tokens = 0
    for batch in iterate_batches(examples, bc, num_steps=steps_per_epoch(len(examples), bc)):
        tokens = put_tokens(batch, mesh, rules)
        with mesh_context(mesh):
            nll, delta = fn(params, rest, base, *(tokens[name] for name in TOKEN_FIELDS))
        loss_sum += np.asarray(nll, np.float64)
        delta_sum += np.asarray(delta, np.float64)
        n_targets += int(batch.loss_mask[:, 1:].sum())
        n_tokens += int(batch.attention_mask.sum())
    return HeldoutEval(
        names=tuple(s.name for s in adapters.specs), base_loss=float(loss_sum[0] / n_targets),
        adapter_loss=tuple(float(v / n_targets) for v in loss_sum[1:]),
        logit_delta_norm=tuple(float(v / n_tokens) for v in delta_sum), n_target_tokens=n_targets,
        n_tokens=n_tokens)
