"""Gemma-2 configuration: the architecture (one frozen section, presets, the Hugging Face mapping), the
built-in tiny model, and the study's `model` section."""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterator
from typing import Any

from lgeo_jax.config import (
    REQUIRED,
    ConfigError,
    DType,
    Problem,
    Section,
    at_least,
    cross_check,
    default_of,
    field,
    greater,
    section,
)
from lgeo_jax.files import read_json

BUILTIN_MODEL = "builtin:tiny"


class AttentionType(enum.Enum):
    """Per-layer attention kind; the window is per-layer *data* so any pattern scans as one stack."""

    LOCAL_SLIDING = "sliding_attention"
    GLOBAL = "full_attention"


@section
class Gemma2Config(Section):
    """Everything that determines a Gemma-2 model's shapes and numerics.

    `layer_types` is the per-layer attention pattern (default: Gemma-2's alternation, sliding on even
    layers); `n_layers` is derived from it when not given, and checked against it when both are.
    """

    vocab_size: int = field(check=greater(0))
    d_model: int = field(check=greater(0))
    n_heads: int = field(check=greater(0))
    n_kv_heads: int = field(check=greater(0))
    head_dim: int = field(check=greater(0))
    mlp_dim: int = field(check=greater(0))
    layer_types: tuple[AttentionType, ...] | None = field(None)
    n_layers: int = field(check=greater(0), derived=lambda c: REQUIRED if c.layer_types is None else len(c.layer_types))
    sliding_window: int = field(4096, check=greater(0))
    query_pre_attn_scalar: float = field(check=greater(0), derived=lambda c: float(c.head_dim))
    attn_logit_softcap: float | None = field(50.0, check=greater(0))
    final_logit_softcap: float | None = field(30.0, check=greater(0))
    rms_eps: float = field(1e-6, check=greater(0))
    rope_base: float = field(10_000.0, check=greater(0))
    max_position_embeddings: int = field(8192, check=greater(0))

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", alternating_layer_types(self.n_layers))

    @cross_check("n_heads", "n_kv_heads")
    def _gqa(self) -> Iterator[Problem]:
        if self.n_heads % self.n_kv_heads:
            yield Problem("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")

    @cross_check("head_dim")
    def _rope(self) -> Iterator[Problem]:
        if self.head_dim % 2:
            yield Problem("head_dim", f"must be even for RoPE, got {self.head_dim}")

    @cross_check("layer_types", "n_layers")
    def _pattern(self) -> Iterator[Problem]:
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            yield Problem("layer_types", f"has {len(self.layer_types)} entries but n_layers is {self.n_layers}")

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head (GQA group size; n_heads for MQA, 1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def layer_windows(self) -> tuple[int, ...]:
        """Attention window per layer: the sliding window, or 0 meaning unlimited (global)."""
        return tuple(self.sliding_window if t is AttentionType.LOCAL_SLIDING else 0 for t in self.layer_types)

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def gemma2_2b(cls) -> Gemma2Config:
        return cls(vocab_size=256_000, d_model=2304, n_heads=8, n_kv_heads=4, head_dim=256, mlp_dim=9216,
                              layer_types=alternating_layer_types(26), query_pre_attn_scalar=256.0)

    @classmethod
    def gemma2_9b(cls) -> Gemma2Config:
        return cls(vocab_size=256_000, d_model=3584, n_heads=16, n_kv_heads=8, head_dim=256, mlp_dim=14336,
                              layer_types=alternating_layer_types(42), query_pre_attn_scalar=256.0)

    @classmethod
    def gemma2_27b(cls) -> Gemma2Config:
        return cls(vocab_size=256_000, d_model=4608, n_heads=32, n_kv_heads=16, head_dim=128, mlp_dim=36864,
                              layer_types=alternating_layer_types(46), query_pre_attn_scalar=144.0)

    # ---- Hugging Face mapping ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> Gemma2Config:
        """Builds a config from a transformers Gemma-2 `config.json` dict (old and new field spellings).

        Every value is validated by this section's own field checks (types, ranges, the layer pattern);
        errors name `source` and the config.json field, never fail with a TypeError."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object (a transformers config), got {type(hf).__name__}")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "gemma2":
            raise ValueError(f"{source}: model_type is {model_type!r} (architectures {archs}); lgeo_jax loads "
                             "Gemma-2 checkpoints only (model_type 'gemma2').")
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: hidden_activation {act!r} is not Gemma-2's tanh-approximate GELU")
        rope = hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters is {rope!r}, expected an object")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported "
                             "(only the default RoPE of Gemma-2)")
        d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None and type(d_model) is int and type(n_heads) is int and n_heads > 0:
            head_dim = d_model // n_heads
        raw = {  # our field -> (config.json field, value); the section converts and checks each
            "vocab_size": ("vocab_size", hf["vocab_size"]),
            "d_model": ("hidden_size", d_model),
            "n_heads": ("num_attention_heads", n_heads),
            "n_kv_heads": ("num_key_value_heads", hf.get("num_key_value_heads") or n_heads),
            "head_dim": ("head_dim", head_dim),
            "mlp_dim": ("intermediate_size", hf["intermediate_size"]),
            "n_layers": ("num_hidden_layers", hf["num_hidden_layers"]),
            "layer_types": ("layer_types", hf.get("layer_types")),
            "sliding_window": ("sliding_window", hf.get("sliding_window") or 4096),
            "query_pre_attn_scalar": ("query_pre_attn_scalar", hf.get("query_pre_attn_scalar") or head_dim),
            "attn_logit_softcap": ("attn_logit_softcapping", hf.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcap": ("final_logit_softcapping", hf.get("final_logit_softcapping", 30.0)),
            "rms_eps": ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            "rope_base": ("rope_theta", rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            "max_position_embeddings": ("max_position_embeddings", hf.get("max_position_embeddings", 8192)),
        }
        try:
            return cls(**{name: value for name, (_, value) in raw.items()})
        except ConfigError as e:
            fields = {name: hf_name for name, (hf_name, _) in raw.items()}
            named = []
            for p in e.problems:
                ours, bracket, rest = p.path.partition("[")
                named.append(f"field '{fields.get(ours, ours)}{bracket}{rest}': {p.message}")
            more = f" (and {len(named) - 3} more)" if len(named) > 3 else ""
            raise ValueError(f"{source}: {'; '.join(named[:3])}{more}") from e

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Gemma2Config:
        cfg_path = os.path.join(os.fspath(path), "config.json")
        hf = read_json(cfg_path, needed_by="an HF Gemma-2 checkpoint directory")
        return cls.from_hf_config(hf, source=cfg_path)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers-loadable `config.json` dict (used to export the built-in tiny model)."""
        return {
                "architectures": ["Gemma2ForCausalLM"],
                "model_type": "gemma2",
                "vocab_size": self.vocab_size,
                "hidden_size": self.d_model,
                "intermediate_size": self.mlp_dim,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim,
                "hidden_activation": "gelu_pytorch_tanh",
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_eps,
                "rope_parameters": {"rope_theta": self.rope_base, "rope_type": "default"},
                "attention_bias": False,
                "attention_dropout": 0.0,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "sliding_window": self.sliding_window,
                "layer_types": [t.value for t in self.layer_types],
                "final_logit_softcapping": self.final_logit_softcap,
                "attn_logit_softcapping": self.attn_logit_softcap,
                "tie_word_embeddings": True,
                "pad_token_id": 0,
                "eos_token_id": 1,
                "bos_token_id": 2,
        }


@section
class BuiltinModelConfig(Gemma2Config):
    """The embedded tiny Gemma-2 that `lgeo` builds and pretrains itself (the offline default): a
    `Gemma2Config` with tiny defaults, the tokenizer's vocabulary (`vocab_size: null`), and how to
    pretrain it (`lgeo_jax.train.pretrain_base` reads the `pretrain_*` fields)."""

    vocab_size: int | None = default_of(Gemma2Config, "vocab_size", None)  # None: the tokenizer's
    d_model: int = default_of(Gemma2Config, "d_model", 64)
    n_heads: int = default_of(Gemma2Config, "n_heads", 4)
    n_kv_heads: int = default_of(Gemma2Config, "n_kv_heads", 2)
    head_dim: int = default_of(Gemma2Config, "head_dim", 16)
    mlp_dim: int = default_of(Gemma2Config, "mlp_dim", 256)
    n_layers: int = default_of(Gemma2Config, "n_layers", 6)
    sliding_window: int = default_of(Gemma2Config, "sliding_window", 64)
    pretrain_steps: int = field(300, check=at_least(0))
    pretrain_lr: float = field(3e-3, check=greater(0))
    pretrain_batch_size: int = field(16, check=greater(0))
    seed: int = field(0, check=at_least(0))

    def with_vocab(self, vocab_size: int) -> BuiltinModelConfig:
        """This architecture with the tokenizer's vocabulary where the config leaves it unset."""
        return self if self.vocab_size is not None else dataclasses.replace(self, vocab_size=vocab_size)


@section
class ModelConfig(Section):
    """The `model` section: a local Hugging Face Gemma-2 directory, or `builtin:tiny`.

    `n_layers` / `d_model` declare a checkpoint's shape so layer choices and sizes validate before the
    checkpoint is downloaded; the study's path check compares them with its config.json.
    """

    checkpoint: str = field(REQUIRED)
    dtype: DType | None = field(None)  # parameters; None: the checkpoint's (bf16 for real Gemma-2)
    activation_dtype: DType | None = field(None)  # residual stream; float32 keeps small deltas exact
    n_layers: int | None = field(None, check=greater(0))
    d_model: int | None = field(None, check=greater(0))
    builtin: BuiltinModelConfig | None = field(derived=lambda m: BuiltinModelConfig() if m.is_builtin else None)

    @property
    def is_builtin(self) -> bool:
        return self.checkpoint == BUILTIN_MODEL

    @property
    def param_dtype(self) -> str | None:
        """The dtype name to load parameters in (`load_model(dtype=...)`); None keeps the checkpoint's."""
        return None if self.dtype is None else self.dtype.value

    @property
    def residual_dtype(self) -> str | None:
        """The residual stream's dtype name (`residuals(dtype=...)`); None: the parameters'."""
        return None if self.activation_dtype is None else self.activation_dtype.value

    @property
    def known_n_layers(self) -> int | None:
        return self.builtin.n_layers if self.builtin is not None else self.n_layers

    @property
    def known_d_model(self) -> int | None:
        return self.builtin.d_model if self.builtin is not None else self.d_model

    @cross_check("checkpoint", "n_layers", "d_model", "builtin")
    def _builtin_or_checkpoint(self) -> Iterator[Problem]:
        if not self.checkpoint:
            yield Problem("checkpoint", f"expected a checkpoint directory or '{BUILTIN_MODEL}', got ''")
        if self.is_builtin:
            for name in ("n_layers", "d_model"):
                if getattr(self, name) is not None:
                    yield Problem(name, f"set it under model.builtin for '{BUILTIN_MODEL}', not here")
        elif self.builtin is not None:
            yield Problem(
                "builtin", f"only used with checkpoint '{BUILTIN_MODEL}'; remove it or set checkpoint: {BUILTIN_MODEL}"
            )


def alternating_layer_types(n_layers: int) -> tuple[AttentionType, ...]:
    """Gemma-2's default pattern: sliding window on even layers, global on odd ones."""
    return tuple(AttentionType.LOCAL_SLIDING if i % 2 == 0 else AttentionType.GLOBAL for i in range(n_layers))
