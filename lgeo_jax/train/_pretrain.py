"""Pretraining of the built-in tiny Gemma-2 on the training split, so the adapters adapt a real model.

Every parameter trains (whole-sequence next-token loss: every real token after the first is a target),
AdamW with linear warmup (10% of steps) and cosine decay, global-norm clipping at 1. Float32 throughout:
the model is tiny and this keeps the saved checkpoint free of bf16 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lgeo_jax.data import TokenizedExample, iterate_batches
from lgeo_jax.model import BuiltinModelConfig, Gemma2, init_model
from lgeo_jax.optim import Schedule, lr_schedule
from lgeo_jax.train._batches import batch_config, check_examples
from lgeo_jax.train._lora_trainer import NonFiniteLossError
from lgeo_jax.train._loss import next_token_loss


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    model: Gemma2
    losses: np.ndarray  # [steps] whole-sequence train loss per step
    seconds: float


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(lr, Schedule.COSINE, max(1, steps // 10), steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


@functools.lru_cache(maxsize=4)
def _make_step(graphdef, lr: float, steps: int):
    tx = _optimizer(lr, steps)

    def loss_fn(params, input_ids, attention_mask):
        model = nnx.merge(graphdef, params)
        logits = model(input_ids, attention_mask)  # [1, B, T, V]
        return next_token_loss(logits, input_ids, attention_mask)[0]  # every real token after the first

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, input_ids, attention_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain_base(cfg: BuiltinModelConfig, examples: Sequence[TokenizedExample], *,
                  progress: bool = True) -> PretrainResult:
    """A fresh `init_model(cfg, seed=cfg.seed)` trained for `cfg.pretrain_steps` AdamW steps on `examples`
    (`cfg.vocab_size` must be set: `cfg.with_vocab(len(tokenizer))`)."""
    steps, lr, batch_size, seed = cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_batch_size, cfg.seed
    check_examples([dataclasses.replace(e, loss_mask=np.ones_like(e.loss_mask)) for e in examples], cfg,
                   what="pretraining data")
    model = init_model(cfg, seed=seed)
    graphdef, params = nnx.split(model)
    if steps == 0:
        return PretrainResult(model, np.zeros((0,)), 0.0)
    opt_state = _optimizer(lr, steps).init(params)
    step_fn = _make_step(graphdef, lr, steps)
    losses = []
    start = time.perf_counter()
    stream = iterate_batches(examples, batch_config(examples, batch_size, seed), num_steps=steps)
    for i, batch in enumerate(tqdm(stream, total=steps, desc="pretrain", unit="step", disable=not progress)):
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(batch.input_ids),
                                          jnp.asarray(batch.attention_mask))
        loss = float(loss)
        if not np.isfinite(loss):
            raise NonFiniteLossError(f"pretraining: non-finite loss {loss} at step {i + 1}; lower "
                                     "model.builtin.pretrain_lr")
        losses.append(loss)
    return PretrainResult(nnx.merge(graphdef, params), np.asarray(losses), time.perf_counter() - start)
