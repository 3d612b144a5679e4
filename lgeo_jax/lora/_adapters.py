"""Stacked LoRA adapters as their own NNX variable type, never merged into the base weights.

`LoraAdapters` holds n adapters at once: per target projection, `a` [L, n, In, R] and `b` [L, n, R, Out]
as `nnx.LoRAParam` (so optimizers select them by type), and a non-trainable per-layer scale [L, n].
Ranks are zero-padded to the largest rank R: padded columns of A / rows of B are zero and add nothing,
and stay zero under AdamW because their gradients are exactly zero.

Every factor carries logical axes (`factor_axes`): A's In axis is named like the base weight's input axis
and B's Out axis like its output axis, so on a mesh (`mesh=` here, or `lgeo_jax.sharding.place`) the
factors are split where the base weight is; the layer, adapter and rank axes follow the `layers`,
`adapters` and `rank` rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lgeo_jax.config import (
    Problem,
    Section,
    at_least,
    cross_check,
    each,
    field,
    greater,
    in_range,
    nonempty_distinct,
    one_of,
    section,
)
from lgeo_jax.model import PROJECTIONS, Gemma2Config, LoraFactors
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, place

# Our target name -> (PEFT module path inside a decoder layer, in features, out features).
TARGETS: dict[str, tuple[str, callable, callable]] = {
    "q": ("self_attn.q_proj", lambda c: c.d_model, lambda c: c.n_heads * c.head_dim),
    "k": ("self_attn.k_proj", lambda c: c.d_model, lambda c: c.n_kv_heads * c.head_dim),
    "v": ("self_attn.v_proj", lambda c: c.d_model, lambda c: c.n_kv_heads * c.head_dim),
    "o": ("self_attn.o_proj", lambda c: c.n_heads * c.head_dim, lambda c: c.d_model),
    "gate": ("mlp.gate_proj", lambda c: c.d_model, lambda c: c.mlp_dim),
    "up": ("mlp.up_proj", lambda c: c.d_model, lambda c: c.mlp_dim),
    "down": ("mlp.down_proj", lambda c: c.mlp_dim, lambda c: c.d_model),
}
DEFAULT_TARGETS = ("q", "k", "v", "o")
PEFT_NAMES = {name: path.split(".")[-1] for name, (path, _, _) in TARGETS.items()}  # "q" -> "q_proj"
TARGET_NAMES = (*TARGETS, *PEFT_NAMES.values())  # what a config may say


def normalize_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Accepts our names ("q") or PEFT's ("q_proj"); fails on names that match no Gemma-2 projection."""
    by_peft = {v: k for k, v in PEFT_NAMES.items()}
    out = []
    for t in targets:
        name = t if t in TARGETS else by_peft.get(t)
        if name is None:
            raise ValueError(f"unknown LoRA target module {t!r}; Gemma-2 has {sorted(PEFT_NAMES.values())}")
        if name not in out:
            out.append(name)
    return tuple(sorted(out, key=list(TARGETS).index))


def module_name(layer: int, target: str) -> str:
    """The HF/PEFT module name of a projection, as PEFT's rank/alpha patterns see it."""
    return f"model.layers.{layer}.{TARGETS[target][0]}"


def _pattern_value(pattern: tuple[tuple[str, float], ...], name: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first key that matches a dotted suffix of the module name wins."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@section
class AdapterSpec(Section):
    """One adapter's hyperparameters: PEFT's LoraConfig fields that matter for the forward pass.

    rank_pattern / alpha_pattern: (module-name regex, value) pairs overriding r / alpha per module, matched as
    PEFT does; layers: the transformed layers (PEFT's layers_to_transform), None = all. Targets may be our
    names ("q") or PEFT's ("q_proj").
    """

    rank: int = field(check=greater(0))
    alpha: float = field(check=greater(0))
    targets: tuple[str, ...] = field(DEFAULT_TARGETS, check=nonempty_distinct(one_of(TARGET_NAMES, "module")))
    use_rslora: bool = field(False)
    dropout: float = field(0.0, check=in_range(0.0, 1.0, hi_open=True))
    rank_pattern: tuple[tuple[str, int], ...] = field(())
    alpha_pattern: tuple[tuple[str, float], ...] = field(())
    layers: tuple[int, ...] | None = field(None, check=each(at_least(0)))
    name: str = field("adapter")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @cross_check("rank_pattern")
    def _pattern_ranks(self) -> Iterator[Problem]:
        for i, (key, r) in enumerate(self.rank_pattern):
            if r <= 0:
                yield Problem(f"rank_pattern[{i}]", f"rank for {key!r} must be > 0, got {r}")

    @property
    def max_rank(self) -> int:
        return max([self.rank] + [r for _, r in self.rank_pattern])

    def module_rank(self, layer: int, target: str) -> int:
        """The rank of this adapter at one module; 0 where it does not transform the module."""
        if target not in self.targets or (self.layers is not None and layer not in self.layers):
            return 0
        return int(_pattern_value(self.rank_pattern, module_name(layer, target), self.rank))

    def trainable_params(self, n_layers: int, dims: Mapping[str, tuple[int, int]]) -> int:
        """LoRA parameters r * (in + out) summed over transformed modules; dims: target -> (in, out)."""
        return sum(self.module_rank(layer, t) * sum(dims[t]) for t in self.targets for layer in range(n_layers))

    def module_scaling(self, layer: int, target: str) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA) at one module; 0 where it does not transform it."""
        r = self.module_rank(layer, target)
        if r == 0:
            return 0.0
        alpha = float(_pattern_value(self.alpha_pattern, module_name(layer, target), self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def factor_axes(target: str) -> dict[str, tuple[str, ...]]:
    """Logical axes of one target's stacked factors: a [L, n, In, R], b [L, n, R, Out] and scale [L, n]."""
    a, b = PROJECTIONS[target].lora_axes()
    return {"a": ("layers", *a), "b": ("layers", *b), "scale": ("layers", "adapters")}


class _TargetFactors(nnx.Module):
    def __init__(self, target: str, a: jax.Array, b: jax.Array, scale: jax.Array):
        axes = factor_axes(target)
        self.a = nnx.LoRAParam(a, logical_axes=axes["a"])  # [L, n, In, R]
        self.b = nnx.LoRAParam(b, logical_axes=axes["b"])  # [L, n, R, Out]
        self.scale = nnx.Variable(scale, logical_axes=axes["scale"])  # [L, n]; not trained


class LoraAdapters(nnx.Module):
    """n LoRA adapters over one Gemma-2 shape, stacked along axis 1 of every factor (axis 0 = layer)."""

    def __init__(self, specs: Sequence[AdapterSpec], factors: Mapping[str, tuple[jax.Array, jax.Array, jax.Array]]):
        self.specs = tuple(specs)
        self.targets = tuple(t for t in TARGETS if t in factors)
        for t in self.targets:
            a, b, scale = factors[t]
            n_layers, n, _, rank = a.shape
            if b.shape[:3] != (n_layers, n, rank) or scale.shape != (n_layers, n) or n != len(self.specs):
                raise ValueError(f"target {t}: inconsistent factor shapes a {a.shape}, b {b.shape}, "
                                 f"scale {scale.shape} for {len(self.specs)} adapter(s)")
            setattr(self, t, _TargetFactors(t, a, b, scale))

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(s.rank for s in self.specs)

    def factors(self, target: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        f = getattr(self, target)
        return f.a[...], f.b[...], f.scale[...]

    def n_layers(self) -> int:
        return self.factors(self.targets[0])[0].shape[0]

    def check_model(self, cfg: Gemma2Config) -> None:
        """Fails with the target and dimension when these adapters were made for another model shape."""
        for t in self.targets:
            a, b, _ = self.factors(t)
            want_in, want_out = TARGETS[t][1](cfg), TARGETS[t][2](cfg)
            if a.shape[0] != cfg.n_layers or a.shape[2] != want_in or b.shape[3] != want_out:
                raise ValueError(
                    f"LoRA target {PEFT_NAMES[t]}: adapter has {a.shape[0]} layers, in {a.shape[2]}, out "
                    f"{b.shape[3]}, but the model has {cfg.n_layers} layers, in {want_in}, out {want_out}: "
                    "the adapter was trained for another model shape")

    def trainable_count(self) -> list[int]:
        """Trainable parameters per adapter, excluding rank padding (what PEFT reports)."""
        dims = {t: (self.factors(t)[0].shape[2], self.factors(t)[1].shape[3]) for t in self.targets}
        return [spec.trainable_params(self.n_layers(), dims) for spec in self.specs]


def target_dims(cfg: Gemma2Config) -> dict[str, tuple[int, int]]:
    """Flattened (in, out) features of every LoRA-targetable projection of a model shape."""
    return {t: (d_in(cfg), d_out(cfg)) for t, (_, d_in, d_out) in TARGETS.items()}


def rank_mask_and_scale(specs: Sequence[AdapterSpec], target: str, n_layers: int,
                        rank: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, n, R] 1/0 mask of each module's live rank columns, and [L, n] scalings, from the specs."""
    mask = np.zeros((n_layers, len(specs), rank), np.float32)
    scale = np.zeros((n_layers, len(specs)), np.float32)
    for layer in range(n_layers):
        for i, spec in enumerate(specs):
            mask[layer, i, : spec.module_rank(layer, target)] = 1.0
            scale[layer, i] = spec.module_scaling(layer, target)
    return mask, scale


def init_adapters(cfg: Gemma2Config, specs: Sequence[AdapterSpec], *, seed: int = 0, random_b: bool = False,
                  mesh: Mesh | None = None, rules: LogicalAxisRules = DEFAULT_RULES) -> LoraAdapters:
    """Fresh float32 adapters: A ~ U(+-1/sqrt(in)) as PEFT's kaiming init, B = 0 (or random, for tests);
    placed on `mesh` by their logical axes when given (the values do not depend on the mesh)."""
    specs = tuple(specs)
    rank = max(s.max_rank for s in specs)
    key = jax.random.key(seed)
    factors = {}
    for t in [t for t in TARGETS if any(t in s.targets for s in specs)]:
        d_in, d_out = TARGETS[t][1](cfg), TARGETS[t][2](cfg)
        key, ka, kb = jax.random.split(key, 3)
        shape_a, shape_b = (cfg.n_layers, len(specs), d_in, rank), (cfg.n_layers, len(specs), rank, d_out)
        a = jax.random.uniform(ka, shape_a, jnp.float32, -1, 1) / math.sqrt(d_in)
        b = jax.random.normal(kb, shape_b, jnp.float32) * 0.1 if random_b else jnp.zeros(shape_b, jnp.float32)
        mask, scale = rank_mask_and_scale(specs, t, cfg.n_layers, rank)
        factors[t] = (a * mask[:, :, None, :], b * mask[:, :, :, None], jnp.asarray(scale))
    return place(LoraAdapters(specs, factors), mesh, rules)


def concat_adapters(groups: Sequence[LoraAdapters]) -> LoraAdapters:
    """One stack from several, padding ranks to the largest and absent targets with zero factors."""
    groups = list(groups)
    if len(groups) == 1:
        return groups[0]
    rank = max(g.factors(g.targets[0])[0].shape[3] for g in groups)
    n_layers = {g.n_layers() for g in groups}
    if len(n_layers) != 1:
        raise ValueError(f"cannot stack adapters with different layer counts {sorted(n_layers)}")
    targets = [t for t in TARGETS if any(t in g.targets for g in groups)]
    factors = {}
    for t in targets:
        shapes = {(g.factors(t)[0].shape[2], g.factors(t)[1].shape[3]) for g in groups if t in g.targets}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack adapters whose {PEFT_NAMES[t]} shapes differ: {sorted(shapes)}")
        (d_in, d_out), = shapes
        parts = []
        for g in groups:
            if t in g.targets:
                a, b, s = g.factors(t)
                pad = rank - a.shape[3]
                parts.append((jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad))),
                              jnp.pad(b, ((0, 0), (0, 0), (0, pad), (0, 0))), s))
            else:
                L, n = g.n_layers(), len(g)
                parts.append((jnp.zeros((L, n, d_in, rank), jnp.float32), jnp.zeros((L, n, rank, d_out), jnp.float32),
                              jnp.zeros((L, n), jnp.float32)))
        factors[t] = tuple(jnp.concatenate([p[k] for p in parts], axis=1) for k in range(3))
    return LoraAdapters([s for g in groups for s in g.specs], factors)


def stacked_lora(adapters: LoraAdapters, *, with_base: bool = True,
                 dropout_key: jax.Array | None = None) -> dict[str, LoraFactors]:
    """The model-facing form: target -> LoraFactors with arrays [L, n, ...].

    `with_base`: the batch also carries the base model as a leading group (slot 0 of `residuals`), which
    gets no LoRA work. With `dropout_key`, each adapter's LoRA dropout (its spec's rate) is applied with an
    independent mask per target and layer, as PEFT's per-module dropout does; without it the pass is
    deterministic.
    """
    out = {}
    keep = jnp.asarray([1.0 - s.dropout for s in adapters.specs], jnp.float32)  # [n]
    for i, t in enumerate(adapters.targets):
        a, b, scale = adapters.factors(t)
        factors = LoraFactors(a=a, b=b, scale=scale, base_slots=1 if with_base else 0,
                              ranks=tuple(min(s.max_rank, a.shape[-1]) for s in adapters.specs))
        if dropout_key is not None:
            n_layers = a.shape[0]
            factors = dataclasses.replace(
                factors, dropout_keep=jnp.broadcast_to(keep, (n_layers, len(keep))),
                dropout_key=jax.random.split(jax.random.fold_in(dropout_key, i), n_layers))
        out[t] = factors
    return out


def pad_layers(adapters: LoraAdapters, n_layers: int) -> LoraAdapters:
    """Extends adapters loaded without a model config to the model's depth (extra layers untransformed)."""
    have = adapters.n_layers()
    if have == n_layers:
        return adapters
    if have > n_layers:
        raise ValueError(f"adapter {adapters.specs[0].name!r} has {have} layers but the model has {n_layers}: "
                         "the adapter was trained for another model shape")
    pad = n_layers - have
    factors = {}
    for t in adapters.targets:
        a, b, s = adapters.factors(t)
        factors[t] = (jnp.pad(a, ((0, pad), (0, 0), (0, 0), (0, 0))), jnp.pad(b, ((0, pad), (0, 0), (0, 0), (0, 0))),
                      jnp.pad(s, ((0, pad), (0, 0))))
    return LoraAdapters(adapters.specs, factors)


def prepare_adapters(adapters: Sequence[LoraAdapters] | LoraAdapters, cfg: Gemma2Config, *,
                     mesh: Mesh | None = None, rules: LogicalAxisRules = DEFAULT_RULES) -> LoraAdapters | None:
    """One validated stack for a model from any mix of single adapters and stacks (None if empty), placed on
    `mesh` when given (a stack already placed there is not copied)."""
    groups = [adapters] if isinstance(adapters, LoraAdapters) else list(adapters)
    if not groups:
        return None
    stack = concat_adapters([pad_layers(g, cfg.n_layers) for g in groups])
    stack.check_model(cfg)
    return place(stack, mesh, rules)
