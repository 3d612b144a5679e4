"""LoRA fine-tuning of a stack of adapters over one frozen Gemma-2, all adapters in one jitted step.

Every rank of a study trains in the same step: one `LoraAdapters` stack (ranks zero-padded) with
`n_adapters = len(stack)`, so each base weight is read once per step for all ranks. The loss is the sum
of the per-adapter mean losses and clipping is per adapter (`_optim.clip_per_adapter`), so each adapter
follows exactly the trajectory it would follow alone (tested against one-by-one training).

Precision: the LoRA factors (master weights, optimizer state) stay float32; the frozen base is cast once
to `compute_dtype` when that is narrower, and the factors are cast inside the forward pass.

Devices: everything runs on one mesh (`mesh=`, default the one the model was placed on). The base
weights are placed by their logical axes (FSDP over `fsdp`, tensor parallel over `model`), the LoRA factors
by theirs (`lgeo_jax.lora.factor_axes`: split like the base weight they adapt), the optimizer state like the
factors, and every micro-batch is split over `data` x `fsdp` (the `batch` rule): data parallelism with the
gradient all-reduce left to XLA. The layout changes float32 reduction order only.

Determinism and resume: batch s of the stream and the dropout key of step s are pure functions of
(seed, s), and a checkpoint stores the step, the factors and the optimizer state (restored into the same
shardings), so a run resumed from step k ends bitwise equal to an uninterrupted one on the same machine
and mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lgeo_jax.data import Batch, BatchConfig, TokenizedExample, iterate_batches, steps_per_epoch
from lgeo_jax.lora import LoraAdapters, factor_axes, stacked_lora
from lgeo_jax.model import Gemma2
from lgeo_jax.optim import lr_schedule
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, mesh_context, mesh_of, place, put, replicated
from lgeo_jax.train._batches import TOKEN_FIELDS, batch_config, check_examples, stack_micro
from lgeo_jax.train._checkpoint import TrainCheckpoints
from lgeo_jax.train._config import TrainConfig
from lgeo_jax.train._loss import next_token_loss
from lgeo_jax.train._optim import init_on_mesh, lora_optimizer, per_adapter_norm


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a (possibly partial) run produced. `losses` / `lrs` cover steps 1..steps_done."""

    adapters: LoraAdapters
    losses: np.ndarray  # [steps_done, n_adapters] mean train loss per optimizer step
    lrs: np.ndarray  # [steps_done]
    total_steps: int
    steps_done: int
    resumed_from: int | None
    step_seconds: np.ndarray  # [steps run in this call] wall time of each step (host-synchronised)
    step_tokens: np.ndarray  # [steps run in this call] real (non-padding) tokens per step, per adapter
    first_of_shape: np.ndarray  # [steps run in this call] True where the step compiled a new shape

    def tokens_per_second(self) -> float:
        """Steady-state adapter-tokens/s (real tokens x adapters), compile steps excluded."""
        keep = ~self.first_of_shape
        if not keep.any():
            raise ValueError("no step without compilation was run; run more steps to measure throughput")
        n = len(self.adapters)
        return float(self.step_tokens[keep].sum() * n / self.step_seconds[keep].sum())


def total_steps(n_examples: int, train: TrainConfig) -> int:
    """Optimizer steps of a run: epochs x micro-batches per epoch / grad_accum_steps, capped by max_steps."""
    micro = steps_per_epoch(n_examples, BatchConfig(batch_size=train.batch_size)) * train.epochs
    steps = max(1, micro // train.grad_accum_steps)
    return min(steps, train.max_steps) if train.max_steps is not None else steps


def split_lora(adapters: LoraAdapters) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, trainable factors as a pure dict {target: {a, b}}, the fixed rest: scales)."""
    graphdef, params, rest = nnx.split(adapters, nnx.LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def merge_lora(graphdef: nnx.GraphDef, params: dict, rest: nnx.State) -> LoraAdapters:
    """The inverse of `split_lora` (works under tracing: builds a fresh state, mutates nothing shared); the
    factors get their logical axes back, so the result can be placed on a mesh again."""
    state = nnx.State({t: {name: nnx.LoRAParam(v, logical_axes=factor_axes(t)[name]) for name, v in f.items()}
                       for t, f in params.items()})
    return nnx.merge(graphdef, state, rest)


def on_mesh(model: Gemma2, adapters: LoraAdapters, mesh: Mesh | None, rules: LogicalAxisRules,
            compute_dtype) -> tuple[Mesh, nnx.GraphDef, nnx.State, nnx.GraphDef, dict, nnx.State]:
    """Model and adapters placed on `mesh` (default: the model's own) by their logical axes, and split for a
    jitted step: (mesh, model_def, frozen base, lora_def, trainable factors, fixed rest)."""
    mesh = mesh_of(model) if mesh is None else mesh
    model_def, base = frozen_base(place(model, mesh, rules), compute_dtype)
    lora_def, params, rest = split_lora(place(adapters, mesh, rules))
    return mesh, model_def, base, lora_def, params, rest


def put_tokens(tokens: Batch | dict[str, np.ndarray], mesh: Mesh, rules: LogicalAxisRules) -> dict[str, jax.Array]:
    """A batch's token arrays ([B, T], or [K, B, T] stacked micro-batches) split over the mesh by the `batch`
    rule, keyed by `TOKEN_FIELDS`."""
    arrays = tokens if isinstance(tokens, dict) else {name: getattr(tokens, name) for name in TOKEN_FIELDS}
    return {name: put(x, (None,) * (x.ndim - 2) + ("batch", None), mesh, rules) for name, x in arrays.items()}


def frozen_base(model: Gemma2, compute_dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The base split for a jitted step, its matrices cast once to a narrower compute dtype."""
    graphdef, state = nnx.split(model)
    compute_dtype = jnp.dtype(compute_dtype)

    def cast(x):
        narrower = jnp.issubdtype(x.dtype, jnp.floating) and compute_dtype.itemsize < x.dtype.itemsize
        return x.astype(compute_dtype) if x.ndim >= 2 and narrower else x

    return graphdef, jax.tree.map(cast, state)


def _loss_fn(model_def, lora_def, compute_dtype, use_dropout, remat):
    def loss(params, rest, base, input_ids, attention_mask, loss_mask, key):
        adapters = merge_lora(lora_def, params, rest)
        lora = stacked_lora(adapters, with_base=False, dropout_key=key if use_dropout else None)
        model = nnx.merge(model_def, base)
        logits = model(input_ids, attention_mask, lora=lora, n_adapters=len(adapters.specs),
                       dtype=compute_dtype, remat=remat)  # [A, B, T, V]
        per_adapter = next_token_loss(logits, input_ids, loss_mask)  # [A]
        return per_adapter.sum(), per_adapter

    return loss


@functools.lru_cache(maxsize=4)
def _grad_fn(model_def, lora_def, compute_dtype, use_dropout, mesh: Mesh):
    # replicated outputs: every process can read the (small) gradients back
    return jax.jit(jax.value_and_grad(_loss_fn(model_def, lora_def, compute_dtype, use_dropout, False), has_aux=True),
                   out_shardings=replicated(mesh))


def loss_and_grads(model: Gemma2, adapters: LoraAdapters, batch: Batch, *, compute_dtype=jnp.float32,
                   dropout_key: jax.Array | None = None, mesh: Mesh | None = None,
                   rules: LogicalAxisRules = DEFAULT_RULES) -> tuple[np.ndarray, dict]:
    """Per-adapter losses [A] and d(sum of losses)/d(factors) as {target: {a, b}} (what the trainer uses),
    computed on `mesh` (default: the model's) with the batch split by the `batch` rule."""
    mesh, model_def, base, lora_def, params, rest = on_mesh(model, adapters, mesh, rules, compute_dtype)
    fn = _grad_fn(model_def, lora_def, jnp.dtype(compute_dtype), dropout_key is not None, mesh)
    tokens = put_tokens(batch, mesh, rules)
    with mesh_context(mesh):
        (_, per), grads = fn(params, rest, base, *(tokens[name] for name in TOKEN_FIELDS),
                             dropout_key if dropout_key is not None else jax.random.key(0))
    return np.asarray(per), jax.tree.map(np.asarray, grads)


@functools.lru_cache(maxsize=8)
def _make_step(model_def, lora_def, train: TrainConfig, total: int, use_dropout: bool, remat: bool, n_adapters: int):
    """The optimizer step, to be jitted with the state's shardings; cached, so reruns and resumes of the same
    run (jitting the same function with equal shardings) reuse its compilation."""
    tx = lora_optimizer(train, total)
    compute_dtype = jnp.dtype(train.compute_dtype.value)
    loss = jax.value_and_grad(_loss_fn(model_def, lora_def, compute_dtype, use_dropout, remat), has_aux=True)

    def step(params, opt_state, rest, base, micro, key):
        """One optimizer step over K micro-batches micro[name]: [K, B, T]; gradients averaged over K."""
        def body(acc, xs):
            grads_acc, loss_acc = acc
            ids, am, lm, j = xs
            (_, per), grads = loss(params, rest, base, ids, am, lm, jax.random.fold_in(key, j))
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + per), None

        k = micro["input_ids"].shape[0]
        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((n_adapters,), jnp.float32))
        xs = (micro["input_ids"], micro["attention_mask"], micro["loss_mask"], jnp.arange(k))
        (grads, losses), _ = jax.lax.scan(body, init, xs)
        grads = jax.tree.map(lambda g: g / k, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses / k, per_adapter_norm(grads)

    return step


def train_lora(model: Gemma2, adapters: LoraAdapters, examples: Sequence[TokenizedExample], train: TrainConfig,
               *, mesh: Mesh | None = None, rules: LogicalAxisRules = DEFAULT_RULES,
               checkpoint_dir: str | os.PathLike | None = None, stop_after: int | None = None,
               remat: bool = False, length_buckets: int = 2, progress: bool = True,
               desc: str = "lora") -> TrainResult:
    """Trains every adapter of the stack on `examples` (base frozen) and returns the trained stack.

    Runs on `mesh` (default: the one the model was placed on; see the module doc for the layout); the
    returned factors stay placed there. With `checkpoint_dir`, the state is saved every
    `train.checkpoint_every` steps and at the end, and a run finding a checkpoint there resumes from it.
    `stop_after` ends the call after that many optimizer steps in total (a planned interruption; rerun to
    continue). `length_buckets`: distinct padded lengths, i.e. compilations of the step (see `batch_config`).
    """
    cfg = model.config
    adapters.check_model(cfg)
    check_examples(examples, cfg, what="LoRA training data")
    n = len(adapters)
    names = [s.name for s in adapters.specs]
    accum = train.grad_accum_steps
    total = total_steps(len(examples), train)
    bc = batch_config(examples, train.batch_size, train.seed, n_buckets=length_buckets)
    schedule = lr_schedule(train.lr, train.schedule, train.warmup(total), total)
    compute_dtype = jnp.dtype(train.compute_dtype.value)

    mesh, model_def, base, lora_def, params, rest = on_mesh(model, adapters, mesh, rules, compute_dtype)
    params = jax.tree.map(jnp.copy, params)  # the step donates its buffers; the caller keeps `adapters`
    opt_state, opt_shardings = init_on_mesh(lora_optimizer(train, total), params, mesh)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    losses: list[list[float]] = []
    start, resumed_from = 0, None
    ckpt = TrainCheckpoints(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.latest_step() is not None:
        start, state, meta = ckpt.restore({"params": params, "opt_state": opt_state})
        if meta.get("total_steps") != total or meta.get("names") != names:
            raise ValueError(f"{ckpt.directory}: checkpoint is from another run (total_steps "
                             f"{meta.get('total_steps')}, adapters {meta.get('names')}; now {total}, {names}); "
                             "delete the directory or rerun the stage with force")
        params, opt_state, losses, resumed_from = state["params"], state["opt_state"], meta["losses"], start

    use_dropout = any(s.dropout > 0 for s in adapters.specs)
    # Outputs keep the inputs' shardings, so every step (and a resumed run, restored into the template's
    # shardings) sees the same placement and reuses one compilation per batch shape.
    step_fn = jax.jit(_make_step(model_def, lora_def, train, total, use_dropout, remat, n),
                      out_shardings=(param_shardings, opt_shardings, replicated(mesh), replicated(mesh)),
                      donate_argnums=(0, 1))
    key = jax.random.key(train.seed)
    end = total if stop_after is None else min(total, stop_after)
    stream = iterate_batches(examples, bc, start_step=start * accum)
    seconds, tokens, first, seen = [], [], [], set()
    last_good = start if resumed_from is not None else None
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress)
    try:
        for step in range(start, end):
            micro = stack_micro([next(stream) for _ in range(accum)])
            shape = micro["input_ids"].shape
            t0 = time.perf_counter()
            with mesh_context(mesh):
                params, opt_state, loss, norm = step_fn(params, opt_state, rest, base,
                                                        put_tokens(micro, mesh, rules),
                                                        jax.random.fold_in(key, step))
            loss, norm = np.asarray(loss), np.asarray(norm)  # waits for the step
            seconds.append(time.perf_counter() - t0)
            tokens.append(int(micro["attention_mask"].sum()))
            first.append(shape not in seen)
            seen.add(shape)
            if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(norm))):
                bad = [names[i] for i in range(n) if not (np.isfinite(loss[i]) and np.isfinite(norm[i]))]
                where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}" if last_good is not None
                         else "no checkpoint was saved yet")
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at optimizer step {step + 1} for adapter(s) {bad} (loss {loss}, "
                    f"grad norm {norm}); {where}. Lower train.lr or check the base weights for NaN.")
            losses.append([float(v) for v in loss])
            done = step + 1
            if ckpt is not None and (done % train.checkpoint_every == 0 or done == total):
                ckpt.save(done, {"params": params, "opt_state": opt_state},
                          {"step": done, "total_steps": total, "names": names, "losses": losses})
                last_good = done
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(loss):.3f}", tok_s=f"{tokens[-1] * n / seconds[-1]:.0f}")
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    steps_done = len(losses)
    return TrainResult(
        adapters=merge_lora(lora_def, params, rest),
        losses=np.asarray(losses, np.float64).reshape(steps_done, n),
        lrs=np.asarray([float(schedule(s)) for s in range(steps_done)]),
        total_steps=total, steps_done=steps_done, resumed_from=resumed_from,
        step_seconds=np.asarray(seconds), step_tokens=np.asarray(tokens, np.int64),
        first_of_shape=np.asarray(first, bool))
