"""`lgeo plan`: what a config will cost before anything runs (shapes by `jax.eval_shape` only)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from lgeo_jax.config import StudyConfig, is_placeholder
from lgeo_jax.lora import AdapterSpec, target_dims
from lgeo_jax.model import Gemma2Config, abstract_model, count_params
from lgeo_jax.model._config import _alternating

_PRESETS = {(c.n_layers, c.d_model): (name, c) for name, c in (
    ("gemma2_2b", Gemma2Config.gemma2_2b()), ("gemma2_9b", Gemma2Config.gemma2_9b()),
    ("gemma2_27b", Gemma2Config.gemma2_27b()))}
# The synthetic tokenizer's vocabulary (lgeo_jax.data.write_synthetic_dataset's default).
_SYNTHETIC_VOCAB = 1024


def builtin_model_config(config: StudyConfig, vocab_size: int) -> Gemma2Config:
    """The built-in tiny model's architecture (Gemma-2's alternating local/global pattern)."""
    b = config.model.builtin
    return Gemma2Config(**b.gemma2_kwargs(vocab_size), layer_types=_alternating(b.n_layers))


def planned_model_config(config: StudyConfig) -> tuple[Gemma2Config, str]:
    """The architecture a config will run, and where it came from (no weights are read)."""
    m = config.model
    if m.is_builtin:
        vocab = m.builtin.vocab_size or _SYNTHETIC_VOCAB
        return builtin_model_config(config, vocab), f"built-in tiny model (vocab {vocab})"
    if not is_placeholder(m.checkpoint) and os.path.isfile(os.path.join(m.checkpoint, "config.json")):
        return Gemma2Config.from_hf_dir(m.checkpoint), f"{m.checkpoint}/config.json"
    preset = _PRESETS.get((m.n_layers, m.d_model))
    if preset is None:
        raise ValueError(f"model.checkpoint {m.checkpoint!r} is not available and model.n_layers/d_model "
                         f"({m.n_layers}, {m.d_model}) match no Gemma-2 preset; point model.checkpoint at the "
                         "HF directory")
    return preset[1], f"preset {preset[0]} (checkpoint not available here; matched by n_layers/d_model)"


def adapter_specs(config: StudyConfig) -> list[AdapterSpec]:
    lora = config.lora
    alphas = lora.alphas or [lora.alpha_over_rank * r for r in lora.ranks]
    return [AdapterSpec(rank=r, alpha=a, targets=lora.targets, use_rslora=lora.use_rslora, dropout=lora.dropout,
                        name=f"r{r}") for r, a in zip(lora.ranks, alphas, strict=True)]


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def plan_text(config: StudyConfig) -> str:
    cfg, source = planned_model_config(config)
    dtype = jnp.dtype(config.model.dtype.value if config.model.dtype else "bfloat16")
    total = count_params(abstract_model(cfg, param_dtype=dtype))
    lines = [
        f"Model: {source}",
        f"  {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} q / {cfg.n_kv_heads} kv heads, head_dim "
        f"{cfg.head_dim}, MLP {cfg.mlp_dim}, vocab {cfg.vocab_size}",
        f"  parameters: {total:,} ({_gib(total * dtype.itemsize)} in {dtype.name})",
        "",
        "LoRA adapters (trainable parameters, % of the base model's parameters):",
    ]
    dims = target_dims(cfg)
    for spec in adapter_specs(config):
        n = spec.trainable_params(cfg.n_layers, dims)
        lines.append(f"  rank {spec.rank:>3}, alpha {spec.alpha:g}, targets {','.join(spec.targets)}: {n:>13,} "
                     f"= {100 * n / total:.4f}% (3 d.p.: {100 * n / total:.3f}%)")
    lines.append("  Note: the paper's Table 2 percentages (0.048/0.097/0.193/0.387) round inconsistently in the "
                 "last digit (r16 is 0.1936%, printed 0.193); we print the exact values.")
    return "\n".join(lines)
