"""`residuals`: the base model's and every adapter's residual streams from one jitted pass."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from lgeo_jax.lora._adapters import LoraAdapters, prepare_adapters, stacked_lora
from lgeo_jax.model import Gemma2
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, constrain, mesh_context, mesh_of, place, put

# Tokens per call ((1 + adapters) x rows x seq) above which XLA:CPU's YNNPACK fusion pass merges the MLP's dots
# into one fusion and per-token throughput drops 14-27% (profiled in bench/README.md (a)); the stacked pass is
# cut into micro-batches that stay at or under it.
CPU_FUSION_TOKENS = 4096


def micro_batch_size(batch: int, seq: int, n_models: int, max_tokens: int | None, *, shards: int = 1) -> int:
    """Sequences per call so that each device's `n_models * rows * seq <= max_tokens` (None: the whole batch).

    `shards` is how many ways the batch axis is split (`batch_shards`): a call keeps a multiple of it, so
    micro-batching never turns a data-parallel batch into a replicated one; at least one row per shard.
    """
    if max_tokens is None:
        return batch
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    per_shard = max(1, max_tokens // (n_models * seq))
    return min(batch, per_shard * shards)


def batch_shards(mesh: Mesh, rules: LogicalAxisRules = DEFAULT_RULES) -> int:
    """How many ways `mesh` splits the batch axis under `rules` (1 on one device)."""
    axes = rules.spec(("batch",), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def check_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Validates a list of layer indices (0-based, block outputs) against the model depth."""
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("layers is empty: ask for at least one layer")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers (valid 0..{n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} contains duplicates")
    return layers


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "n_adapters", "dtype"))
def _residuals_jit(graphdef, state, input_ids, attention_mask, lora, *, layers, n_adapters, dtype):
    model = nnx.merge(graphdef, state)
    x, positions, valid = model.prepare_inputs(input_ids, attention_mask, n_adapters, dtype)
    # Only the blocks up to the deepest requested layer run; no final norm, no LM head.
    _, captured = model.run_blocks(x, positions, valid, n_layers=max(layers) + 1, capture=layers, lora=lora)
    c, _, t, d = captured.shape
    out = captured.reshape(c, -1, n_adapters, t, d).transpose(2, 0, 1, 3, 4)  # [C, B*A, T, D] -> [A, C, B, T, D]
    return constrain(out, ("adapters", None, "batch", None, None))


def residuals(
    model: Gemma2,
    input_ids: Int[Array, "B T"],
    *,
    layers: Sequence[int],
    adapters: Sequence[LoraAdapters] | LoraAdapters = (),
    attention_mask: Int[Array, "B T"] | None = None,
    dtype: jnp.dtype | None = None,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules = DEFAULT_RULES,
    micro_batch: int | None = None,
) -> Float[Array, "A C B T D"]:
    """Residual streams after the given blocks: `(1 + n_adapters, len(layers), batch, seq, d_model)` float32.

    Index 0 on the first axis is the base model, index i the i-th adapter (stacks count one per adapter),
    all from one jitted pass that reads each base weight once. Layer L is the output of block L before any
    final norm (HF `hidden_states[L + 1]`). `dtype` is the activation dtype (default: the parameters');
    float32 with bf16 weights keeps small adapter deltas above the residual stream's rounding noise.

    Runs on `mesh` (default: the one the model was placed on, e.g. by `load_model(mesh=...)`): the model and
    adapters are placed there by their logical axes (no copy when already there), the batch is split by the
    `batch` rule, and so is the result's batch axis.

    `micro_batch` (sequences per call, default: the whole batch) runs the stacked pass over slices of the batch
    and concatenates them (a remainder slice runs as its own, smaller call): the values equal the whole-batch
    pass to float32 rounding, and on CPU it keeps each call under the fusion cliff (`micro_batch_size`).
    """
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {micro_batch}")
    mesh = mesh_of(model) if mesh is None else mesh
    stack = prepare_adapters(adapters, model.config, mesh=mesh, rules=rules)
    lora = None if stack is None else stacked_lora(stack)
    n_adapters = 0 if stack is None else len(stack)
    layers = check_layers(layers, model.config.n_layers)
    if np.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {np.shape(input_ids)}")
    if attention_mask is None:
        attention_mask = np.ones(np.shape(input_ids), np.int32)
    if np.shape(attention_mask) != np.shape(input_ids):
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {np.shape(input_ids)}")
    graphdef, state = nnx.split(place(model, mesh, rules))
    batch = np.shape(input_ids)[0]
    step = batch if micro_batch is None else min(micro_batch, batch)
    kw = dict(layers=layers, n_adapters=1 + n_adapters, dtype=None if dtype is None else jnp.dtype(dtype).name)
    parts = []
    with mesh_context(mesh):
        for start in range(0, batch, step):
            ids, mask = (_int32_batch(x[start:start + step], mesh, rules) for x in (input_ids, attention_mask))
            parts.append(_residuals_jit(graphdef, state, ids, mask, lora, **kw))  # [A, C, b, T, D]
        if len(parts) == 1:
            return parts[0]
        return constrain(jnp.concatenate(parts, axis=2), ("adapters", None, "batch", None, None))  # [A, C, B, T, D]


def _int32_batch(x, mesh: Mesh, rules: LogicalAxisRules) -> jax.Array:
    """A [B, T] token batch (host or device) as int32, split over the mesh by the `batch` rule."""
    x = x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)
    return put(x, ("batch", None), mesh, rules)
