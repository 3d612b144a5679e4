"""The Gemma-2 stack: embedding, a scanned block stack with residual capture, final norm and LM head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lgeo_jax.model._config import Gemma2Config
from lgeo_jax.model._layers import _INIT, Block, LoraFactors, RMSNorm, softcap
from lgeo_jax.sharding import constrain

# Per-layer LoRA factors for the whole stack: target name ("q", "k", ..., "down") -> factors whose
# arrays carry a leading layer axis [L, A, ...]. Base weights never see these.
StackedLora = Mapping[str, LoraFactors]


class Gemma2(nnx.Module):
    """Gemma-2 decoder. Block parameters are stacked along a leading layer axis and run in a loop.

    The loop indexes one layer's weights per iteration (a scan with static trip count), so compile time
    does not grow with depth, and local/global attention is a per-layer window value, not separate code.
    """

    def __init__(self, cfg: Gemma2Config, *, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if cfg.vocab_size is None:
            raise ValueError("Gemma2: vocab_size is unset (the built-in model takes the tokenizer's: "
                             "`BuiltinModelConfig.with_vocab(len(tokenizer))`)")
        self.config = cfg
        self.embed = nnx.Param(_INIT(rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype),
                               logical_axes=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        # The vmap stacked every block weight along a new leading axis: name it, so each parameter's
        # logical_axes cover all of its axes (what `lgeo_jax.sharding.place` and the loader lay out by).
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Variable):
                var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=param_dtype)

    # ---- pieces ------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """[B, T] -> [B, T, D], scaled by sqrt(d_model) rounded to the activation dtype (59.75 for 9B bf16)."""
        normalizer = jnp.asarray(self.config.d_model**0.5, dtype=dtype)
        # Gather whole rows: with the table's embed axis split (fsdp) XLA cannot split the lookup's output by
        # batch and falls back to replicating it; a vocab split alone is a masked lookup plus one all-reduce.
        table = constrain(self.embed[...], ("vocab", None))  # [V, D]
        return table[input_ids].astype(dtype) * normalizer

    def run_blocks(self, x: jax.Array, positions: jax.Array, valid: jax.Array, *, n_layers: int,
                   capture: Sequence[int] = (), lora: StackedLora | None = None, remat: bool = False,
                   start: int = 0) -> tuple[jax.Array, jax.Array]:
        """Runs blocks start..n_layers-1 on x [B, T, D] and captures the residual after each layer in `capture`.

        valid: [B, T] bool (False = padding). Returns (x after block n_layers-1, captured [C, B, T, D] float32
        in the order of `capture`). With `start` = L + 1, x is a residual after block L (layer L, e.g. one
        spliced in by `lgeo_jax.lora.splice`): each block still reads its own weights, window and LoRA factors.
        """
        if not 0 <= start <= n_layers:
            raise ValueError(f"run_blocks: start {start} must lie in 0..n_layers ({n_layers})")
        if any(not start <= layer < n_layers for layer in capture):
            raise ValueError(f"run_blocks: capture {list(capture)} must lie in {start}..{n_layers - 1}")
        cfg = self.config
        windows = jnp.asarray(cfg.layer_windows()[:n_layers], jnp.int32)  # [L]; 0 = global
        slots = np.full((n_layers,), -1, np.int32)
        for slot, layer in enumerate(capture):
            slots[layer] = slot
        slots = jnp.asarray(slots)
        idx = jnp.arange(x.shape[1])
        causal_valid = (idx[None, :, None] >= idx[None, None, :]) & valid[:, None, :]  # [B, T, S]
        offset = idx[:, None] - idx[None, :]  # [T, S] query index minus key index
        graphdef, stacked = nnx.split(self.blocks)
        lora = dict(lora or {})

        def layer_step(x, stacked_l, lora_l, window):
            mask = causal_valid & ((window == 0) | (offset < window))[None]  # [B, T, S]
            return nnx.merge(graphdef, stacked_l)(x, positions, mask, lora_l)

        if remat:
            layer_step = jax.checkpoint(layer_step)

        def body(layer, carry):
            x, captured = carry
            take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)
            x = layer_step(x, jax.tree.map(take, stacked), jax.tree.map(take, lora), windows[layer])
            x = constrain(x, ("batch", None, None))  # the stream stays split by batch rows between blocks
            if capture:
                slot = slots[layer]
                captured = jax.lax.cond(slot >= 0, lambda c: c.at[slot].set(x.astype(jnp.float32)),
                                        lambda c: c, captured)
            return x, captured

        captured = constrain(jnp.zeros((len(capture),) + x.shape, jnp.float32), (None, "batch", None, None))
        return jax.lax.fori_loop(start, n_layers, body, (x, captured))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm, tied LM head and final softcap: [B, T, D] -> [B, T, V] float32."""
        h = self.final_norm(x)
        out = jnp.einsum("BTD,VD->BTV", h, self.embed[...].astype(h.dtype), preferred_element_type=jnp.float32)
        return constrain(softcap(out, self.config.final_logit_softcap), ("batch", None, "vocab"))

    # ---- whole passes ------------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 lora: StackedLora | None = None, n_adapters: int = 1, dtype: jnp.dtype | None = None,
                 remat: bool = False) -> jax.Array:
        """Logits [A, B, T, V] float32 for the base (A=1) or base plus adapters stacked in `lora`."""
        x, positions, valid = self.prepare_inputs(input_ids, attention_mask, n_adapters, dtype)
        x, _ = self.run_blocks(x, positions, valid, n_layers=self.config.n_layers, lora=lora, remat=remat)
        out = self.logits(x)  # [B*A, T, V]
        return out.reshape(-1, n_adapters, *out.shape[1:]).swapaxes(0, 1)  # [A, B, T, V]

    def prepare_inputs(self, input_ids: jax.Array, attention_mask: jax.Array | None, n_adapters: int,
                       dtype: jnp.dtype | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Embeds once, then repeats embedding, positions and validity for each adapter: [B*A, ...], row
        b * A + a (the inputs of `run_blocks` for the base and `n_adapters - 1` adapters in one pass; the
        adapter axis sits behind the batch so a batch split over devices stays split the same way)."""
        dtype = jnp.dtype(dtype or self.embed[...].dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        valid = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)  # [B, T]
        x = constrain(self.embed_tokens(input_ids, dtype), ("batch", None, None))  # [B, T, D]
        return tuple(jnp.repeat(a, n_adapters, axis=0) for a in (x, positions, valid))  # [B*A, ...]


def init_model(cfg: Gemma2Config, *, seed: int = 0, param_dtype: jnp.dtype = jnp.float32) -> Gemma2:
    """A randomly initialised model (HF's N(0, 0.02) projections, zero norms)."""
    return Gemma2(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: Gemma2Config, *, param_dtype: jnp.dtype = jnp.bfloat16) -> Gemma2:
    """The model's shapes and dtypes only (`jax.eval_shape`): nothing is allocated."""
    return nnx.eval_shape(lambda: Gemma2(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def count_params(model: Gemma2) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
