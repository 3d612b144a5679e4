"""PEFT LoRA directories in and out (`adapter_config.json` + `adapter_model.safetensors`).

Keys: `base_model.model.model.layers.{i}.{self_attn|mlp}.{name}_proj.lora_{A|B}.weight`, A (r, in),
B (out, r), scaling alpha / r (alpha / sqrt(r) with rsLoRA), per-module r / alpha from rank_pattern /
alpha_pattern. Exports load in `peft.PeftModel.from_pretrained` unchanged.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lgeo_jax.config import ConfigError
from lgeo_jax.files import atomic_write_json, read_json
from lgeo_jax.lora._adapters import (
    PEFT_NAMES,
    TARGETS,
    AdapterSpec,
    LoraAdapters,
    module_name,
    normalize_targets,
    rank_mask_and_scale,
)
from lgeo_jax.model import Gemma2Config
from lgeo_jax.safetensors_io import SafetensorsFile, write_safetensors
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, place

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# LoraConfig options that change the math in ways we do not implement: refuse rather than be wrong.
_UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
    "modules_to_save": (None, []), "layer_replication": (None, []), "lora_bias": (False, None),
    "use_qalora": (False, None), "trainable_token_indices": (None, []),
}


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    cfg = read_json(cfg_path, needed_by="a PEFT LoRA directory")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (a PEFT LoraConfig), got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only plain LoRA ('LORA') is supported")
    for field, allowed in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in allowed:
            what = "DoRA" if field == "use_dora" else f"{field}={cfg[field]!r}"
            raise ValueError(f"{cfg_path}: field {field!r} = {cfg[field]!r}: {what} is not supported; only plain "
                             "LoRA on Gemma-2 projections is")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in cfg:
            raise ValueError(f"{cfg_path}: missing field {field!r}")
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise ValueError(f"{cfg_path}: layers_pattern {cfg['layers_pattern']!r} is not Gemma-2's 'layers'")
    return cfg


def _targets_from_config(cfg: dict, cfg_path: str) -> tuple[str, ...]:
    tm = cfg["target_modules"]
    if tm == "all-linear":
        return tuple(TARGETS)
    if isinstance(tm, str):  # a regex over full module names, as PEFT allows
        try:
            pattern = re.compile(tm)
        except re.error as e:
            raise ValueError(f"{cfg_path}: target_modules regex {tm!r} is not a valid regular expression ({e})") from e
        hits = [t for t in TARGETS if any(pattern.fullmatch(module_name(i, t)) for i in range(64))]
        if not hits:
            raise ValueError(f"{cfg_path}: target_modules regex {tm!r} matches no Gemma-2 projection")
        return tuple(hits)
    if not isinstance(tm, list):
        raise ValueError(f"{cfg_path}: target_modules is {tm!r}; expected a list of module names, a regex or "
                         "'all-linear'")
    try:
        return normalize_targets(tm)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: target_modules: {e}") from e


def _spec_from_config(cfg: dict, cfg_path: str, targets: tuple[str, ...], name: str) -> AdapterSpec:
    """The adapter's spec, every field validated by `AdapterSpec` itself; errors name the file and PEFT field."""
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{cfg_path}: {key} must be an object of module pattern -> value, got {value!r}")
        patterns[key] = tuple(value.items())
    layers = cfg.get("layers_to_transform")
    peft_field = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "layers": "layers_to_transform"}
    try:
        return AdapterSpec(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=targets,
                           use_rslora=cfg.get("use_rslora", False), dropout=cfg.get("lora_dropout") or 0.0,
                           layers=[layers] if isinstance(layers, int) else layers, name=name, **patterns)
    except ConfigError as e:
        problems = "; ".join(f"{peft_field.get(p.path.split('[')[0], p.path)}: {p.message}" for p in e.problems)
        raise ValueError(f"{cfg_path}: {problems}") from e


def load_adapter(path: str | os.PathLike, *, config: Gemma2Config | None = None, name: str | None = None,
                 mesh: Mesh | None = None, rules: LogicalAxisRules = DEFAULT_RULES) -> LoraAdapters:
    """Reads a PEFT LoRA directory as a one-adapter `LoraAdapters` (float32 factors), placed on `mesh` by
    their logical axes when given.

    With `config` the adapter is checked against (and padded to) that model's layer count; without it the
    layer count is the deepest adapted layer + 1 and `residuals` pads it to the model.
    """
    path = os.fspath(path)
    cfg = _read_config(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    w_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(w_path):
        alt = os.path.join(path, "adapter_model.bin")
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if os.path.exists(alt) else ""
        raise FileNotFoundError(f"{w_path}: missing{hint}")
    weights = SafetensorsFile(w_path)
    targets = _targets_from_config(cfg, cfg_path)
    spec = _spec_from_config(cfg, cfg_path, targets, name or os.path.basename(os.path.normpath(path)))

    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    by_peft = {v: k for k, v in PEFT_NAMES.items()}
    for key in weights.entries:
        m = _KEY.match(key)
        if m is None or by_peft.get(m.group(3)) is None or TARGETS[by_peft[m.group(3)]][0].split(".")[0] != m.group(2):
            raise ValueError(f"{w_path}: unexpected tensor {key!r}; expected "
                             "base_model.model.model.layers.{i}.{self_attn|mlp}.<proj>.lora_{A|B}.weight "
                             "(DoRA magnitudes, embeddings and modules_to_save are not supported)")
        target = by_peft[m.group(3)]
        if target not in targets:
            raise ValueError(f"{w_path}: tensor {key!r} targets {m.group(3)}, which is not in {cfg_path} "
                             f"target_modules {cfg['target_modules']}")
        found.setdefault((target, int(m.group(1))), {})[m.group(4)] = weights.get(key)

    if not found:
        raise ValueError(f"{w_path}: no LoRA tensors found")
    n_layers = max(layer for _, layer in found) + 1
    if config is not None:
        if n_layers > config.n_layers:
            raise ValueError(f"{w_path}: adapter has layer {n_layers - 1} but the model has {config.n_layers} layers")
        n_layers = config.n_layers
    rank = spec.max_rank
    factors = {}
    for t in targets:
        d_in = d_out = None
        a = b = None
        for layer in range(n_layers):
            want_rank = spec.module_rank(layer, t)
            pair = found.get((t, layer))
            prefix = f"base_model.model.{module_name(layer, t)}"
            if pair is None:
                if want_rank:
                    raise ValueError(f"{w_path}: missing keys {prefix}.lora_A.weight / lora_B.weight "
                                     f"({cfg_path} targets {PEFT_NAMES[t]} on layer {layer})")
                continue
            if set(pair) != {"A", "B"}:
                missing = "B" if "A" in pair else "A"
                raise ValueError(f"{w_path}: missing key {prefix}.lora_{missing}.weight")
            la, lb = pair["A"], pair["B"]
            for part, w in (("A", la), ("B", lb)):
                if not np.isfinite(w.astype(np.float32)).all():
                    raise ValueError(f"{w_path}: tensor {prefix}.lora_{part}.weight contains NaN or Inf")
            if la.ndim != 2 or lb.ndim != 2 or la.shape[0] != lb.shape[1]:
                raise ValueError(f"{w_path}: rank mismatch between {prefix}.lora_A.weight {la.shape} and "
                                 f"lora_B.weight {lb.shape} (A must be (r, in), B (out, r))")
            if la.shape[0] != want_rank:
                raise ValueError(f"{w_path}: {prefix}.lora_A.weight has rank {la.shape[0]} but {cfg_path} implies "
                                 f"r={want_rank} for this module (r / rank_pattern)")
            if a is None:
                d_in, d_out = la.shape[1], lb.shape[0]
                a = np.zeros((n_layers, 1, d_in, rank), np.float32)
                b = np.zeros((n_layers, 1, rank, d_out), np.float32)
            if (la.shape[1], lb.shape[0]) != (d_in, d_out):
                raise ValueError(f"{w_path}: {prefix} has in/out {(la.shape[1], lb.shape[0])}, other layers "
                                 f"{(d_in, d_out)}")
            a[layer, 0, :, : la.shape[0]] = la.astype(np.float32).T
            b[layer, 0, : la.shape[0], :] = lb.astype(np.float32).T
        if a is None:
            raise ValueError(f"{w_path}: {cfg_path} targets {PEFT_NAMES[t]} but no tensors for it were found")
        _, scale = rank_mask_and_scale([spec], t, n_layers, rank)
        factors[t] = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale))
    adapters = LoraAdapters([spec], factors)
    if config is not None:
        adapters.check_model(config)
    return place(adapters, mesh, rules)


def save_adapter(adapters: LoraAdapters, path: str | os.PathLike, *, index: int = 0,
                 base_model_name_or_path: str | None = None, dtype=np.float32) -> None:
    """Writes adapter `index` of the stack as a PEFT LoRA directory (loads in PeftModel unchanged)."""
    path = os.fspath(path)
    spec = adapters.specs[index]
    tensors = {}
    for t in adapters.targets:
        if t not in spec.targets:
            continue
        a, b, _ = (np.asarray(jax.device_get(x)) for x in adapters.factors(t))
        for layer in range(a.shape[0]):
            r = spec.module_rank(layer, t)
            if r == 0:
                continue
            prefix = f"base_model.model.{module_name(layer, t)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer, index, :, :r].T.astype(dtype))
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer, index, :r, :].T.astype(dtype))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": [PEFT_NAMES[t] for t in spec.targets], "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern),
        "layers_to_transform": None if spec.layers is None else list(spec.layers),
        "modules_to_save": None,
    }
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    atomic_write_json(os.path.join(path, CONFIG_FILE), config)
