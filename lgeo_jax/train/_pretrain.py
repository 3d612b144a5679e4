"""Pretraining of the built-in tiny Gemma-2 on the training split, so the adapters adapt a real model.

Every parameter trains (whole-sequence next-token loss: every real token after the first is a target),
AdamW with linear warmup (10% of steps) and cosine decay, global-norm clipping at 1. Float32 throughout:
the model is tiny and this keeps the saved checkpoint free of bf16 rounding. On a mesh the weights and
their optimizer state are placed by the weights' logical axes and each batch is split by the `batch` rule,
as in LoRA training.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lgeo_jax.data import TokenizedExample, iterate_batches
from lgeo_jax.model import BuiltinModelConfig, Gemma2, init_model
from lgeo_jax.optim import Schedule, lr_schedule
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, make_mesh, mesh_context, place, replicated
from lgeo_jax.train._batches import batch_config, check_examples
from lgeo_jax.train._lora_trainer import NonFiniteLossError, put_tokens
from lgeo_jax.train._loss import next_token_loss
from lgeo_jax.train._optim import init_on_mesh


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
    """The optimizer step, to be jitted with the state's shardings (cached: equal jits share a compilation)."""
    tx = _optimizer(lr, steps)

    def loss_fn(params, input_ids, attention_mask):
        model = nnx.merge(graphdef, params)
        logits = model(input_ids, attention_mask)  # [1, B, T, V]
        return next_token_loss(logits, input_ids, attention_mask)[0]  # every real token after the first

    def step(params, opt_state, input_ids, attention_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain_base(cfg: BuiltinModelConfig, examples: Sequence[TokenizedExample], *, mesh: Mesh | None = None,
                  rules: LogicalAxisRules = DEFAULT_RULES, progress: bool = True) -> PretrainResult:
    """A fresh `init_model(cfg, seed=cfg.seed)` trained for `cfg.pretrain_steps` AdamW steps on `examples`
    (`cfg.vocab_size` must be set: `cfg.with_vocab(len(tokenizer))`), on `mesh` (default: the first device);
    the returned model stays placed there."""
    steps, lr, batch_size, seed = cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_batch_size, cfg.seed
    check_examples([dataclasses.replace(e, loss_mask=np.ones_like(e.loss_mask)) for e in examples], cfg,
                   what="pretraining data")
    mesh = make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
    model = place(init_model(cfg, seed=seed), mesh, rules)
    graphdef, params = nnx.split(model)
    if steps == 0:
        return PretrainResult(model, np.zeros((0,)), 0.0)
    opt_state, opt_shardings = init_on_mesh(_optimizer(lr, steps), params, mesh)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    step_fn = jax.jit(_make_step(graphdef, lr, steps), donate_argnums=(0, 1),
                      out_shardings=(param_shardings, opt_shardings, replicated(mesh)))
    losses = []
    start = time.perf_counter()
    stream = iterate_batches(examples, batch_config(examples, batch_size, seed), num_steps=steps)
    for i, batch in enumerate(tqdm(stream, total=steps, desc="pretrain", unit="step", disable=not progress)):
        tokens = put_tokens(batch, mesh, rules)
        with mesh_context(mesh):
            params, opt_state, loss = step_fn(params, opt_state, tokens["input_ids"], tokens["attention_mask"])
        loss = float(loss)
        if not np.isfinite(loss):
            raise NonFiniteLossError(f"pretraining: non-finite loss {loss} at step {i + 1}; lower "
                                     "model.builtin.pretrain_lr")
        losses.append(loss)
    return PretrainResult(nnx.merge(graphdef, params), np.asarray(losses), time.perf_counter() - start)
