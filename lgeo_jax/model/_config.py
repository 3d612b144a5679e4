"""Gemma-2 architecture configuration: one frozen dataclass, presets, and the Hugging Face mapping."""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any

from lgeo_jax._files import read_json


class AttentionType(enum.Enum):
    """Per-layer attention kind; the window is per-layer *data* so any pattern scans as one stack."""

    LOCAL_SLIDING = "sliding_attention"
    GLOBAL = "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Everything that determines a Gemma-2 model's shapes and numerics.

    The layer count is derived from `layer_types`, so a config cannot disagree with itself.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    layer_types: tuple[AttentionType, ...]
    sliding_window: int = 4096
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    rms_eps: float = 1e-6
    rope_base: float = 10_000.0
    max_position_embeddings: int = 8192

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "sliding_window"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.layer_types:
            problems.append("layer_types is empty: a model needs at least one layer")
        if self.query_pre_attn_scalar <= 0:
            problems.append(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")
        if problems:
            raise ValueError("invalid Gemma2Config: " + "; ".join(problems))
        object.__setattr__(self, "layer_types", tuple(AttentionType(t) for t in self.layer_types))

    @property
    def n_layers(self) -> int:
        return len(self.layer_types)

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
        """Builds a config from a transformers Gemma-2 `config.json` dict (old and new field spellings)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "gemma2":
            raise ValueError(f"{source}: model_type is {model_type!r} (architectures {archs}); lgeo_jax loads "
                                              "Gemma-2 checkpoints only (model_type 'gemma2').")
        missing = [k for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                                                      "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        n_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types") or alternating_layer_types(n_layers)
        if len(layer_types) != n_layers:
            raise ValueError(f"{source}: layer_types has {len(layer_types)} entries but num_hidden_layers is "
                                              f"{n_layers}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: hidden_activation {act!r} is not Gemma-2's tanh-approximate GELU")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported "
                                              "(only the default RoPE of Gemma-2)")
        n_heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // n_heads)
        try:
            return cls(
                    vocab_size=int(hf["vocab_size"]),
                    d_model=int(hf["hidden_size"]),
                    n_heads=n_heads,
                    n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                    head_dim=head_dim,
                    mlp_dim=int(hf["intermediate_size"]),
                    layer_types=tuple(AttentionType(t) for t in layer_types),
                    sliding_window=int(hf.get("sliding_window") or 4096),
                    query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
                    attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping", 50.0)),
                    final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", 30.0)),
                    rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                    max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            )
        except ValueError as e:  # a bad layer type string or an inconsistent shape
            raise ValueError(f"{source}: {e}") from e

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


def alternating_layer_types(n_layers: int) -> tuple[AttentionType, ...]:
    """Gemma-2's default pattern: sliding window on even layers, global on odd ones."""
    return tuple(AttentionType.LOCAL_SLIDING if i % 2 == 0 else AttentionType.GLOBAL for i in range(n_layers))


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)
