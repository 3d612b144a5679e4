"""Gemma-2 building blocks in Flax NNX: RMSNorm, attention, GeGLU MLP and the decoder block.

Einsum letters, used everywhere in this package:
  B batch (the adapter axis A folded in behind it when adapters run: row b * A + a), T query positions,
  S key positions, D d_model, N query heads, K key/value heads, G query heads per kv head, H head_dim,
  F mlp width, V vocabulary, A adapters (base included), R LoRA rank.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lgeo_jax.model._config import Gemma2Config

# HF initializer_range for Gemma-2: every projection and the embedding start at N(0, 0.02^2).
_INIT = nnx.initializers.normal(stddev=0.02)
# Finite "minus infinity": a query row whose keys are all masked (left padding) gets a uniform softmax
# instead of NaN, so padded rows stay finite and never poison a reduction.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection: its einsum `x, w -> y` and the logical axes of its weight, in the weight's letter order.

    The LoRA update of the projection is derived from the same einsum (`project`), and so are the logical axes
    of its factors (`lora_axes`), so a projection is described once.
    """

    spec: str
    axes: tuple[str, ...]

    @property
    def operands(self) -> tuple[str, str, str]:
        """(x letters, w letters, output letters): `BTD,DNH->BTNH` gives ("BTD", "DNH", "BTNH")."""
        lhs, out = self.spec.split("->")
        x_letters, w_letters = lhs.split(",")
        return x_letters, w_letters, out

    @property
    def contracted(self) -> str:
        """The weight's letters summed over (D for q, NH for o)."""
        _, w_letters, out = self.operands
        return "".join(c for c in w_letters if c not in out)

    @property
    def produced(self) -> str:
        """The weight's letters that reach the output (NH for q, D for o)."""
        _, w_letters, out = self.operands
        return "".join(c for c in w_letters if c in out)

    def lora_axes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Logical axes of one layer's factors a [A, In, R] and b [A, R, Out]: In (the contracted axes,
        flattened) is named after the weight's first contracted axis and Out after its first produced one, so
        A and B are split where the base weight is (qwix's LoRA inherits the base weight's sharding the same
        way); the flattened axis splits on its leading letter, e.g. heads for N*H. (When the mesh axis divides
        the flattened size but not the leading one, e.g. 1 kv head on model = 2, the factor splits where the
        base weight stays whole: XLA reshards, the result is the same.)"""
        axis = dict(zip(self.operands[1], self.axes, strict=True))
        return ("adapters", axis[self.contracted[0]], "rank"), ("adapters", "rank", axis[self.produced[0]])


PROJECTIONS: dict[str, Projection] = {
    "q": Projection("BTD,DNH->BTNH", ("embed", "heads", "head_dim")),
    "k": Projection("BSD,DKH->BSKH", ("embed", "kv_heads", "head_dim")),
    "v": Projection("BSD,DKH->BSKH", ("embed", "kv_heads", "head_dim")),
    "o": Projection("BTNH,NHD->BTD", ("heads", "head_dim", "embed")),
    "gate": Projection("BTD,DF->BTF", ("embed", "mlp")),
    "up": Projection("BTD,DF->BTF", ("embed", "mlp")),
    "down": Projection("BTF,FD->BTD", ("mlp", "embed")),
}


def _weight(name: str, shape: tuple[int, ...], param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(_INIT(rngs.params(), shape, param_dtype), logical_axes=PROJECTIONS[name].axes)


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One layer's LoRA factors for one projection, for all adapters at once.

    Stored in PEFT's flat layout, transposed: a: [A, In, R], b: [A, R, Out], where In/Out are the base
    weight's contracted/produced axes flattened (q: In = D, Out = N*H; o: In = N*H, Out = D).
    scale: [A] (alpha / r, or alpha / sqrt(r) for rsLoRA). Ranks are zero-padded to R.
    `base_slots` leading slots of every batch row's adapter group carry no adapter (the base model riding
    along in the same pass): they get the base projection only, so no LoRA FLOPs are spent on them.
    For training, LoRA dropout (PEFT's: on the adapter's input only) needs `dropout_key` (a PRNG key) and
    `dropout_keep` [A] (keep probabilities, 1 = no dropout). `ranks` (static, one per adapter, None = R for
    all): columns of A / rows of B beyond an adapter's rank are padding in every layer and are not multiplied.
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    dropout_keep: jax.Array | None = None
    dropout_key: jax.Array | None = None
    base_slots: int = 0
    ranks: tuple[int, ...] | None = None


jax.tree_util.register_dataclass(
    LoraFactors, data_fields=["a", "b", "scale", "dropout_keep", "dropout_key"], meta_fields=["base_slots", "ranks"])


def project(proj: Projection, x: jax.Array, w: jax.Array, lora: LoraFactors | None = None) -> jax.Array:
    """`einsum(proj.spec, x, w)` plus, when given, every adapter's low-rank update derived from the same spec.

    The adapter axis is folded into x's leading batch axis behind the batch ([B*(base_slots + A), ...], so a
    batch sharded over devices stays sharded) and the base matmul reads `w` once for the base and all
    adapters. The LoRA path is derived from the base einsum (`BTD,DNH->BTNH` becomes `BTD,DR->BTR` and
    `BTR,RNH->BTNH` per adapter), so one rule covers every projection.
    """
    # float32 accumulation, rounded once to the activation dtype (XLA:CPU's bf16-out dots are ~3x slower)
    y = jnp.einsum(proj.spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if lora is None:
        return y
    x_letters, w_letters, out = proj.operands
    contracted, produced = proj.contracted, proj.produced
    kept = "".join(c for c in x_letters if c not in contracted)
    dims = dict(zip(w_letters, w.shape, strict=True))
    n_adapters, _, rank = lora.a.shape
    a = lora.a.astype(x.dtype).reshape(n_adapters, *(dims[c] for c in contracted), rank)
    b = lora.b.astype(x.dtype).reshape(n_adapters, rank, *(dims[c] for c in produced))
    scale = lora.scale.astype(x.dtype)  # [A]
    groups = lora.base_slots + n_adapters
    xa = x.reshape(-1, groups, *x.shape[1:])[:, lora.base_slots:]  # [B, A, ...]
    if lora.dropout_key is not None:
        keep = lora.dropout_keep.astype(x.dtype).reshape((1, n_adapters) + (1,) * (xa.ndim - 2))
        survives = jax.random.bernoulli(lora.dropout_key, keep, xa.shape)
        xa = jnp.where(survives, xa / keep, 0).astype(x.dtype)
    yg = y.reshape(-1, groups, *y.shape[1:])  # [B, G, ...]
    # One plain GEMM pair per adapter (the adapter count is static and small): an einsum with the adapter axis
    # in the middle ([B, A, T, D]) makes XLA:CPU transpose x and the update around a batched dot, which cost
    # 2.7x the LoRA work of this loop (bench/README.md (a)).
    parts = [yg[:, g] for g in range(lora.base_slots)]
    for i, r in enumerate(lora.ranks or (rank,) * n_adapters):
        h = jnp.einsum(f"{x_letters},{contracted}R->{kept}R", xa[:, i], a[i, ..., :r]) * scale[i]  # [B, T, r]
        parts.append(yg[:, lora.base_slots + i] + jnp.einsum(f"{kept}R,R{produced}->{out}", h, b[i, :r]))  # [B, T, ...]
    return jnp.stack(parts, axis=1).reshape(y.shape)


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: `x / rms(x) * (1 + w)`, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding in the half-split layout of Gemma/HF. x: [B, T, N, H]; positions: [B, T]."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nnx.Module):
    """Grouped-query attention with Gemma-2's logit softcap and query_pre_attn_scalar scaling."""

    def __init__(self, cfg: Gemma2Config, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = _weight("q", (d, n, h), param_dtype, rngs)
        self.k = _weight("k", (d, k, h), param_dtype, rngs)
        self.v = _weight("v", (d, k, h), param_dtype, rngs)
        self.o = _weight("o", (n, h, d), param_dtype, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 lora: dict[str, LoraFactors]) -> jax.Array:
        """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] (True = may attend)."""
        cfg = self.cfg
        q = project(PROJECTIONS["q"], x, self.q[...], lora.get("q"))  # BTD,DNH->BTNH: [B, T, N, H]
        k = project(PROJECTIONS["k"], x, self.k[...], lora.get("k"))  # BSD,DKH->BSKH: [B, S, K, H]
        v = project(PROJECTIONS["v"], x, self.v[...], lora.get("v"))  # BSD,DKH->BSKH: [B, S, K, H]
        q = apply_rope(q, positions, cfg.rope_base)
        k = apply_rope(k, positions, cfg.rope_base)
        b, t = q.shape[:2]
        q = q.reshape(b, t, cfg.n_kv_heads, cfg.n_groups, cfg.head_dim)  # [B, T, K, G, H]
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = softcap(logits * cfg.query_pre_attn_scalar**-0.5, cfg.attn_logit_softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)  # [B, K, G, T, S]
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32).astype(x.dtype)
        out = out.reshape(b, t, cfg.n_heads, cfg.head_dim)  # [B, T, N, H]
        return project(PROJECTIONS["o"], out, self.o[...], lora.get("o"))  # BTNH,NHD->BTD: [B, T, D]


class MLP(nnx.Module):
    """GeGLU feed-forward with the tanh-approximate GELU."""

    def __init__(self, cfg: Gemma2Config, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.gate = _weight("gate", (d, f), param_dtype, rngs)
        self.up = _weight("up", (d, f), param_dtype, rngs)
        self.down = _weight("down", (f, d), param_dtype, rngs)

    def __call__(self, x: jax.Array, lora: dict[str, LoraFactors]) -> jax.Array:
        gate = project(PROJECTIONS["gate"], x, self.gate[...], lora.get("gate"))  # BTD,DF->BTF: [B, T, F]
        up = project(PROJECTIONS["up"], x, self.up[...], lora.get("up"))  # BTD,DF->BTF: [B, T, F]
        hidden = jax.nn.gelu(gate, approximate=True) * up  # [B, T, F]
        return project(PROJECTIONS["down"], hidden, self.down[...], lora.get("down"))  # BTF,FD->BTD: [B, T, D]


class Block(nnx.Module):
    """One decoder layer: sandwich norms around attention and the MLP (four RMSNorms)."""

    def __init__(self, cfg: Gemma2Config, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=param_dtype)
        self.pre_attn_norm = norm()
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = norm()
        self.pre_mlp_norm = norm()
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_mlp_norm = norm()

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 lora: dict[str, LoraFactors]) -> jax.Array:
        x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x), positions, mask, lora))
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x), lora))
