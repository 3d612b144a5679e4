"""Random tiny Gemma-2 checkpoints in the real HF format, built with transformers (tests only)."""

from __future__ import annotations

import dataclasses

import torch
import transformers


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A tiny Gemma-2 shape; prime-ish sizes so that shape bugs cannot hide."""

    name: str
    vocab: int = 97
    d_model: int = 48
    heads: int = 6
    kv_heads: int = 2
    head_dim: int = 10
    mlp: int = 70
    layers: int = 3
    window: int = 5
    query_scalar: int = 24
    layer_types: tuple[str, ...] | None = None

    def hf_config(self) -> transformers.Gemma2Config:
        kw = {}
        if self.layer_types is not None:
            kw["layer_types"] = list(self.layer_types)
        return transformers.Gemma2Config(
            vocab_size=self.vocab, hidden_size=self.d_model, intermediate_size=self.mlp,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, sliding_window=self.window, query_pre_attn_scalar=self.query_scalar,
            max_position_embeddings=256, attn_implementation="eager", **kw)


SPECS = [
    TinySpec("gqa_headdim_ne_d_over_h"),
    TinySpec("mqa_odd_layers", d_model=40, heads=4, kv_heads=1, head_dim=16, mlp=52, layers=5, window=4,
             query_scalar=16),
    TinySpec("mha_custom_pattern", d_model=36, heads=3, kv_heads=3, head_dim=12, mlp=44, layers=4, window=3,
             query_scalar=7,
             layer_types=("full_attention", "sliding_attention", "sliding_attention", "full_attention")),
]


def build_hf_model(spec: TinySpec, seed: int = 0) -> transformers.Gemma2ForCausalLM:
    """A Gemma2ForCausalLM with *every* parameter random (HF init leaves the norms at zero)."""
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(spec.hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            p.copy_(torch.randn_like(p) * scale)
    return model


def save_hf_model(model, path, *, dtype=torch.float32, max_shard_size=None) -> None:
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, safe_serialization=True, **kw)
