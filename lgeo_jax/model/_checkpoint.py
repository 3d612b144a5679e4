"""Hugging Face Gemma-2 checkpoints: validated, tensor-by-tensor loading onto devices, and saving.

Loading never holds the model in host memory: each safetensors file is memory-mapped, every header is
checked (names, shapes, dtypes, byte ranges) before the first byte is read, and each tensor goes from
the map straight to its target sharding. Stacked layer weights are filled one layer at a time in place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lgeo_jax.files import atomic_write_json, read_json
from lgeo_jax.model._config import Gemma2Config
from lgeo_jax.model._transformer import Gemma2, abstract_model
from lgeo_jax.safetensors_io import SafetensorsFile, write_safetensors
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """How one of our parameters is stored in HF: name template, HF shape, and the layout transforms."""

    hf_name: str  # may contain {i} for the layer index
    hf_shape: Callable[[Gemma2Config], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, Gemma2Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Gemma2Config], np.ndarray]


def _same(w, cfg):
    return w


def _linear_in(n_heads_of: Callable[[Gemma2Config], int]) -> tuple[Callable, Callable]:
    """HF (heads*H, D) <-> ours (D, heads, H)."""
    return (lambda w, c: w.T.reshape(c.d_model, n_heads_of(c), c.head_dim),
            lambda w, c: w.reshape(c.d_model, -1).T)


_Q = _linear_in(lambda c: c.n_heads)
_KV = _linear_in(lambda c: c.n_kv_heads)
_T = (lambda w, c: w.T, lambda w, c: w.T)

# Our parameter path (as in nnx state) -> HF tensor. Block entries are per layer and stacked on load.
_MAPPINGS: dict[tuple[str, ...], _Mapping] = {
    ("embed",): _Mapping("model.embed_tokens.weight", lambda c: (c.vocab_size, c.d_model), _same, _same),
    ("final_norm", "scale"): _Mapping("model.norm.weight", lambda c: (c.d_model,), _same, _same),
    ("blocks", "pre_attn_norm", "scale"): _Mapping("model.layers.{i}.input_layernorm.weight",
                                                   lambda c: (c.d_model,), _same, _same),
    ("blocks", "post_attn_norm", "scale"): _Mapping("model.layers.{i}.post_attention_layernorm.weight",
                                                    lambda c: (c.d_model,), _same, _same),
    ("blocks", "pre_mlp_norm", "scale"): _Mapping("model.layers.{i}.pre_feedforward_layernorm.weight",
                                                  lambda c: (c.d_model,), _same, _same),
    ("blocks", "post_mlp_norm", "scale"): _Mapping("model.layers.{i}.post_feedforward_layernorm.weight",
                                                   lambda c: (c.d_model,), _same, _same),
    ("blocks", "attn", "q"): _Mapping("model.layers.{i}.self_attn.q_proj.weight",
                                      lambda c: (c.n_heads * c.head_dim, c.d_model), *_Q),
    ("blocks", "attn", "k"): _Mapping("model.layers.{i}.self_attn.k_proj.weight",
                                      lambda c: (c.n_kv_heads * c.head_dim, c.d_model), *_KV),
    ("blocks", "attn", "v"): _Mapping("model.layers.{i}.self_attn.v_proj.weight",
                                      lambda c: (c.n_kv_heads * c.head_dim, c.d_model), *_KV),
    ("blocks", "attn", "o"): _Mapping("model.layers.{i}.self_attn.o_proj.weight",
                                      lambda c: (c.d_model, c.n_heads * c.head_dim),
                                      lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
                                      lambda w, c: w.reshape(-1, c.d_model).T),
    ("blocks", "mlp", "gate"): _Mapping("model.layers.{i}.mlp.gate_proj.weight",
                                        lambda c: (c.mlp_dim, c.d_model), *_T),
    ("blocks", "mlp", "up"): _Mapping("model.layers.{i}.mlp.up_proj.weight", lambda c: (c.mlp_dim, c.d_model), *_T),
    ("blocks", "mlp", "down"): _Mapping("model.layers.{i}.mlp.down_proj.weight",
                                        lambda c: (c.d_model, c.mlp_dim), *_T),
}
# Tensors a Gemma-2 checkpoint may carry that we deliberately do not load (the LM head is tied).
_IGNORED = {"lm_head.weight"}


def _hf_names(path: tuple[str, ...], cfg: Gemma2Config) -> list[str]:
    m = _MAPPINGS[path]
    return [m.hf_name.format(i=i) for i in range(cfg.n_layers)] if path[0] == "blocks" else [m.hf_name]


def _open_checkpoint(path: str, cfg: Gemma2Config) -> dict[str, SafetensorsFile]:
    """Opens and validates every file; returns HF tensor name -> the file that holds it."""
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_path):
        weight_map = _weight_map(index_path)
        files = {}
        for fname in sorted(set(weight_map.values())):
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{fpath}: listed in {INDEX_FILE} but missing")
            files[fname] = SafetensorsFile(fpath)
        where = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise CheckpointError(f"{files[fname].path}: tensor {name!r} is listed in {INDEX_FILE} but absent")
            where[name] = files[fname]
    elif os.path.isfile(single_path):
        f = SafetensorsFile(single_path)
        where = {name: f for name in f.entries}
    else:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; expected an HF Gemma-2 checkpoint "
                              "directory (config.json plus safetensors weights)")
    expected = {}
    for p, m in _MAPPINGS.items():
        for name in _hf_names(p, cfg):
            expected[name] = m.hf_shape(cfg)
    for name, shape in expected.items():
        if name not in where:
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
        got = where[name].entries[name][1]
        if got != shape:
            raise CheckpointError(f"{where[name].path}: tensor {name!r} has shape {got}, but config.json implies "
                                  f"{shape}")
    unexpected = sorted(set(where) - set(expected) - _IGNORED)
    if unexpected:
        raise CheckpointError(f"{where[unexpected[0]].path}: unexpected tensor(s) for Gemma-2 {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}; is this a Gemma-2 checkpoint?")
    return where


def _weight_map(index_path: str) -> dict[str, str]:
    """The index's tensor -> shard file map; every shard must be a plain file name inside the checkpoint."""
    index = read_json(index_path, needed_by="a sharded safetensors checkpoint")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a safetensors index (expected an object with a 'weight_map' "
                              f"object of tensor name -> shard file)")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {fname!r} is not a file name inside the "
                                  "checkpoint directory")
    return weight_map


def _target_sharding(logical_axes, shape, mesh: Mesh | None, rules: LogicalAxisRules):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return rules.sharding(logical_axes, mesh, shape)


def _drop_leading(sharding) -> Any:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _put(view: np.ndarray, sharding, dtype: np.dtype, where: str) -> jax.Array:
    """Places a tensor on its sharding from `view` (a view of the memory map in our layout): each local device's
    piece is read, checked finite and cast on its own, so a host reads only the bytes of its own shards."""

    last: list = [None, None]  # devices holding the same piece (a replicated axis) read it once

    def piece(idx) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key != last[0]:
            w = np.ascontiguousarray(view[idx])
            if not np.all(np.isfinite(w.astype(np.float32))):
                raise CheckpointError(f"{where} contains NaN or Inf")
            last[:] = key, w.astype(dtype)
        return last[1]

    return jax.make_array_from_callback(view.shape, sharding, piece)


def check_checkpoint(path: str | os.PathLike) -> Gemma2Config:
    """Everything `load_model` validates before reading a weight (config.json, every file header, tensor
    names and shapes), without loading anything; returns the checkpoint's architecture."""
    path = os.fspath(path)
    cfg = Gemma2Config.from_hf_dir(path)
    _open_checkpoint(path, cfg)
    return cfg


def load_model(path: str | os.PathLike, *, dtype: Any = None, mesh: Mesh | None = None,
               rules: LogicalAxisRules = DEFAULT_RULES) -> Gemma2:
    """Loads an HF Gemma-2 checkpoint directory into a `Gemma2`, tensor by tensor, onto `mesh`.

    dtype None keeps the checkpoint's own dtype. Everything is validated before loading starts; on any
    error nothing is returned, so a partially loaded model can never be used.
    """
    path = os.fspath(path)
    cfg = Gemma2Config.from_hf_dir(path)
    where = _open_checkpoint(path, cfg)
    embed_name = _MAPPINGS[("embed",)].hf_name
    dtype = jnp.dtype(dtype) if dtype is not None else where[embed_name].entries[embed_name][0]
    abstract = abstract_model(cfg, param_dtype=dtype)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    filled = []
    for path_key, var in flat:
        key = tuple(str(k) for k in path_key)
        mapping = _MAPPINGS.get(key)
        if mapping is None:
            raise CheckpointError(f"internal: no checkpoint mapping for model parameter {'.'.join(key)}")
        logical = tuple(var.get_metadata()["logical_axes"])
        sharding = _target_sharding(logical, var.get_value().shape, mesh, rules)
        names = _hf_names(key, cfg)

        def put(name, sharding, mapping=mapping):  # to_ours only transposes and splits axes: still a view
            return _put(mapping.to_ours(where[name].get(name), cfg), sharding, dtype,
                        f"{where[name].path}: tensor {name!r}")

        if key[0] == "blocks":
            value = _zeros(var.get_value().shape, dtype, sharding)
            layer_sharding = _drop_leading(sharding)
            for i, name in enumerate(names):
                value = _set_layer(value, i, put(name, layer_sharding))
        else:
            value = put(names[0], sharding)
        filled.append((path_key, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@jax.jit
def _set_layer_impl(stacked, i, layer):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


_set_layer_donating = jax.jit(_set_layer_impl, donate_argnums=0)


def _set_layer(stacked: jax.Array, i: int, layer: jax.Array) -> jax.Array:
    """stacked[i] = layer, in place (the old buffer is donated)."""
    return _set_layer_donating(stacked, jnp.int32(i), layer)


def save_model(model: Gemma2, path: str | os.PathLike, *, dtype: Any = None,
               max_shard_bytes: int | None = None) -> None:
    """Writes `model` as an HF Gemma-2 checkpoint directory (config.json + safetensors, sharded if asked)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    tensors: dict[str, np.ndarray] = {}
    for path_key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(k) for k in path_key)
        m = _MAPPINGS[key]
        value = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            value = value.astype(dtype)
        if key[0] == "blocks":
            for i in range(cfg.n_layers):
                tensors[m.hf_name.format(i=i)] = np.ascontiguousarray(m.to_hf(value[i], cfg))
        else:
            tensors[m.hf_name] = np.ascontiguousarray(m.to_hf(value, cfg))
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(next(iter(tensors.values())).dtype)
    atomic_write_json(os.path.join(path, "config.json"), hf_cfg)
    if max_shard_bytes is None:
        write_safetensors(os.path.join(path, SINGLE_FILE), tensors, metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, t in tensors.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + t.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = t
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, fname), shard, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    atomic_write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
