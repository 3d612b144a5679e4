"""`lgeo plan`: what a config will cost before anything runs (shapes by `jax.eval_shape` only)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from lgeo_jax.config import is_placeholder
from lgeo_jax.lora import target_dims
from lgeo_jax.model import Gemma2Config, abstract_model, count_params
from lgeo_jax.sae import estimate_sae_memory
from lgeo_jax.stages._corpus import corpus_size_bytes
from lgeo_jax.study import StudyConfig

_PRESETS = {(c.n_layers, c.d_model): (name, c) for name, c in (
    ("gemma2_2b", Gemma2Config.gemma2_2b()), ("gemma2_9b", Gemma2Config.gemma2_9b()),
    ("gemma2_27b", Gemma2Config.gemma2_27b()))}
# The synthetic tokenizer's vocabulary (lgeo_jax.data.write_synthetic_dataset's default).
_SYNTHETIC_VOCAB = 1024
# Kept tokens per record when no token budget is set (template + response, no BOS): measured means of the
# Gemma tokenizer on the 5,000-record Alpaca subset (106.9 per record) and of the synthetic default (~63).
_TOKENS_PER_RECORD_ALPACA = 107
_TOKENS_PER_RECORD_SYNTHETIC = 63


def planned_model_config(config: StudyConfig) -> tuple[Gemma2Config, str]:
    """The architecture a config will run, and where it came from (no weights are read)."""
    m = config.model
    if m.is_builtin:
        cfg = m.builtin.with_vocab(_SYNTHETIC_VOCAB)
        return cfg, f"built-in tiny model (vocab {cfg.vocab_size})"
    if not is_placeholder(m.checkpoint) and os.path.isfile(os.path.join(m.checkpoint, "config.json")):
        return Gemma2Config.from_hf_dir(m.checkpoint), f"{m.checkpoint}/config.json"
    preset = _PRESETS.get((m.n_layers, m.d_model))
    if preset is None:
        raise ValueError(f"model.checkpoint {m.checkpoint!r} is not available and model.n_layers/d_model "
                         f"({m.n_layers}, {m.d_model}) match no Gemma-2 preset; point model.checkpoint at the "
                         "HF directory")
    return preset[1], f"preset {preset[0]} (checkpoint not available here; matched by n_layers/d_model)"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def plan_text(config: StudyConfig) -> str:
    cfg, source = planned_model_config(config)
    dtype = jnp.dtype(config.model.param_dtype or "bfloat16")
    total = count_params(abstract_model(cfg, param_dtype=dtype))
    lines = [
        f"Model: {source}",
        f"  {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} q / {cfg.n_kv_heads} kv heads, head_dim "
        f"{cfg.head_dim}, MLP {cfg.mlp_dim}, vocab {cfg.vocab_size}",
        f"  parameters: {total:,} ({_gib(total * dtype.itemsize)} in {dtype.name}; per device with the weights "
        f"sharded over fsdp x model = 8: {_gib(total * dtype.itemsize / 8)})",
        "",
        "LoRA adapters (trainable parameters, % of the base model's parameters):",
    ]
    dims = target_dims(cfg)
    for spec in config.lora.adapter_specs():
        n = spec.trainable_params(cfg.n_layers, dims)
        lines.append(f"  rank {spec.rank:>3}, alpha {spec.alpha:g}, targets {','.join(spec.targets)}: {n:>13,} "
                     f"= {100 * n / total:.4f}% (3 d.p.: {100 * n / total:.3f}%)")
    lines.append("  Note: the paper's Table 2 percentages (0.048/0.097/0.193/0.387) round inconsistently in the "
                 "last digit (r16 is 0.1936%, printed 0.193); we print the exact values.")
    lines += ["", *_corpus_lines(config, cfg), "", *_sae_lines(config, cfg)]
    return "\n".join(lines)


def _corpus_lines(config: StudyConfig, cfg: Gemma2Config) -> list[str]:
    ex = config.extract
    if ex.token_budget:
        tokens, how = ex.token_budget, "extract.token_budget"
    else:
        records = sum(getattr(config.data, s)[1] - getattr(config.data, s)[0] for s in ex.splits)
        per_record = _TOKENS_PER_RECORD_SYNTHETIC if config.data.is_synthetic else _TOKENS_PER_RECORD_ALPACA
        tokens, how = records * per_record, f"estimate: {records:,} records x ~{per_record} tokens"
    per_array = tokens * cfg.d_model * jnp.dtype(ex.store_dtype.value).itemsize
    n_arrays = len(ex.layers) * (1 + len(config.lora.ranks))
    return [f"Corpus ({ex.store_dtype.value}, {tokens:,} token vectors; {how}):",
            f"  {_gb(per_array)} per (adapter, layer) array; {n_arrays} arrays ({len(config.lora.ranks)} adapter "
            f"deltas + the base, stored once, x {len(ex.layers)} layers) plus token metadata: "
            f"{_gb(corpus_size_bytes(config, tokens, cfg.d_model))} on disk"]


def _sae_lines(config: StudyConfig, cfg: Gemma2Config) -> list[str]:
    s = config.sae
    width = s.resolved_width(cfg.d_model)
    n_delta = len(config.lora.ranks) * len(config.extract.layers) * len(s.seeds)
    n_base = len(config.extract.layers) * len(s.seeds) if s.base_saes else 0
    lines = [f"SAEs: {n_delta} delta + {n_base} base SAEs of {cfg.d_model} -> {width} ({s.architecture.value}), "
             f"batch {s.batch_size}, float32 with Adam, trained in one job:"]
    for devices in (1, 8):
        mem = estimate_sae_memory(cfg.d_model, width, n_delta + n_base, s.batch_size, {"model": devices, "data": 1},
                                  arch=s.architecture)
        lines.append(f"  on {devices} device(s), SAE axis sharded: {mem.describe()}")
    return lines


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"
