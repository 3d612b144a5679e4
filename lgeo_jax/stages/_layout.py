"""The on-disk layout of a run, defined once: every stage finds its inputs and outputs through these.

  data/records.json                 all records (Alpaca JSON list; the synthetic default or a copy of the real set)
  data/tokenizer/                   tokenizer directory for AutoTokenizer (synthetic default only)
  base/model/                       HF Gemma-2 checkpoint (builtin tiny model only; real runs use model.checkpoint)
  adapters/<name>/                  one PEFT LoRA directory per rank (name: r4, r8, ...)
  corpus/store/                     the tensorstore corpus (unless extract.store points elsewhere); corpus/stats.json
  saes/job/saes/r{R}_L{L}_s{seed}/  delta SAE for adapter rank R at layer L (`lgeo_jax.sae.save_sae` format)
  saes/job/saes/base_L{L}_s{seed}/  SAE on h_base at layer L (base-base baseline; with the first seed, the reference
                                    dictionary of every layer the config gives none for)
  saes/sweep.json                   the L1 sweep (Table 12): {"adapter", "layer", "selected_l1", "points": [...]}
  saes/health.json                  every trained SAE's training health (`lgeo_jax.sae.sae_health`) + warnings
  analysis/results.json             every table; analysis/layers/L{L}.{json,npz} one unit per layer
  report/                           report.md, figures.csv / figures.json, plots
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lgeo_jax.corpus import store_url
from lgeo_jax.data import AlpacaRecord, load_alpaca
from lgeo_jax.model import Gemma2Config, abstract_model, count_params
from lgeo_jax.sharding import MESH_AXES, make_mesh
from lgeo_jax.stages._manifest import Run
from lgeo_jax.study import StudyConfig

STORE_DIR = "store"


def records_path(run: Run) -> Path:
    return run.stage_dir("data") / "records.json"


def load_records(run: Run) -> list[AlpacaRecord]:
    return load_alpaca(records_path(run))


def tokenizer_dir(run: Run, config: StudyConfig) -> Path:
    """The synthetic tokenizer, the configured one, or the checkpoint's own (HF dirs ship theirs)."""
    if config.data.tokenizer:
        return Path(config.data.tokenizer)
    synthetic = run.stage_dir("data") / "tokenizer"
    if synthetic.is_dir():
        return synthetic
    return Path(config.model.checkpoint)


def load_tokenizer(run: Run, config: StudyConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(run, config)))


def base_checkpoint(run: Run, config: StudyConfig) -> Path:
    """The base model's HF directory: the one `lgeo` built and pretrained, or the user's checkpoint."""
    return run.stage_dir("base") / "model" if config.model.is_builtin else Path(config.model.checkpoint)


def adapter_dirs(run: Run, config: StudyConfig) -> list[Path]:
    return [run.stage_dir("adapters") / name for name in config.lora.names]


def corpus_store(config: StudyConfig, run: Run) -> str:
    """The store's kvstore URL: `extract.store`, or `store/` inside the corpus stage's directory."""
    return store_url(config.extract.store or run.stage_dir("corpus") / STORE_DIR)


def delta_sae_name(rank: int, layer: int, seed: int) -> str:
    return f"r{rank}_L{layer}_s{seed}"


def base_sae_name(layer: int, seed: int) -> str:
    return f"base_L{layer}_s{seed}"


def delta_sae_dir(run: Run, rank: int, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "job" / "saes" / delta_sae_name(rank, layer, seed)


def base_sae_dir(run: Run, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "job" / "saes" / base_sae_name(layer, seed)


def sweep_path(run: Run) -> Path:
    return run.stage_dir("saes") / "sweep.json"


def health_path(run: Run) -> Path:
    return run.stage_dir("saes") / "health.json"


def results_path(run: Run) -> Path:
    return run.stage_dir("analysis") / "results.json"


def layer_arrays_path(run: Run, layer: int) -> Path:
    """Raw per-row max-cosines and principal angles of one layer (`<adapter>/<comparison>/<what>` keys)."""
    return run.stage_dir("analysis") / "layers" / f"L{layer}.npz"


# ---- the mesh every model stage runs on ------------------------------------------------------------

WEIGHT_SHARE = 0.5
"""Of one device's memory, what an auto mesh lets the base weights take: the rest is for activations, the
LoRA optimizer state and XLA's scratch (`lgeo run`'s resource check still compares each stage's whole need)."""


def weight_bytes(cfg: Gemma2Config, config: StudyConfig) -> int:
    """The base model's weights in the dtype the stages load them in (no weights read)."""
    dtype = jnp.dtype(config.model.param_dtype or "bfloat16")
    return count_params(abstract_model(cfg, param_dtype=dtype)) * dtype.itemsize


def mesh_sizes(config: StudyConfig, cfg: Gemma2Config, n_devices: int, device_bytes: int | None) -> dict[str, int]:
    """`config.mesh` resolved on `n_devices` devices of `device_bytes` each (None: unknown, no limit): auto
    axes take every device data-parallel, moving to `fsdp` as needed for the weights to fit `WEIGHT_SHARE`."""
    budget = None if device_bytes is None else int(device_bytes * WEIGHT_SHARE)
    return config.mesh.sizes(n_devices, weight_bytes=weight_bytes(cfg, config), device_bytes=budget)


def device_memory(config: StudyConfig) -> int | None:
    """One device's memory: `resources.device_memory_gib`, else what the accelerator reports; None on CPU
    (its devices share the host's memory, which the resource check covers)."""
    if config.resources.device_memory_gib is not None:
        return int(config.resources.device_memory_gib * 2**30)
    device = jax.local_devices()[0]
    return None if device.platform == "cpu" else (device.memory_stats() or {}).get("bytes_limit")


def stage_devices() -> list[jax.Device] | None:
    """The devices a stage runs on: every device (None) in a job of one process; in a job of several, this
    process's own, since the stage a job of several processes runs (the corpus) gives each process its own
    share of the batches. (Training across hosts, fed by each host's rows, is a further step: issue 13,
    Build item 2.)"""
    return None if jax.process_count() == 1 else jax.local_devices()


def stage_mesh(config: StudyConfig, base_dir: Path) -> Mesh:
    """The mesh the adapters and corpus stages load the model of `base_dir` onto (`stage_devices`)."""
    cfg = Gemma2Config.from_hf_dir(base_dir)
    devices = stage_devices()
    n = jax.device_count() if devices is None else len(devices)
    try:
        return make_mesh(**mesh_sizes(config, cfg, n, device_memory(config)), devices=devices)
    except ValueError as e:
        if devices is None:
            raise
        raise ValueError(f"{e} (in a job of {jax.process_count()} processes the mesh is one process's {n} "
                         "devices)") from None


def mesh_is_auto(config: StudyConfig) -> bool:
    """No mesh size is set in the config (every axis auto)."""
    return all(getattr(config.mesh, axis) is None for axis in MESH_AXES)


def sae_mesh(config: StudyConfig) -> Mesh | None:
    """The SAE jobs' mesh: the configured one when any size is set, else None (`lgeo_jax.sae.default_mesh`:
    the SAE axis over as many devices as divide the SAE count, the batch over the rest)."""
    return None if mesh_is_auto(config) else config.mesh.build()
