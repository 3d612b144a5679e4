"""The `crosscoders` stage (optional: `crosscoder.enabled`): one crosscoder per (adapter, layer, seed) on
(h_base, h_base + delta) of `sae.train_split`, all in one vmapped, sharded job, then per crosscoder the
latent classes, decoder cosines and latent scaling on `analysis.eval_split` rows, and the comparison of its
adapter-only latents with the delta SAE of the same (adapter, layer, seed), beside the nulls
(`lgeo_jax.analysis.analyze_crosscoder`; intervals with the analysis section's settings).

Output: ``job/`` (checkpoints, metrics.csv, ``crosscoders/<name>/`` in the crosscoder format),
``results.json`` (``{"enabled", "crosscoders": [{name, adapter, layer, seed, health, ...record}]}``) and
``arrays/<name>.npz`` (per-latent arrays for the report's plots). Disabled, it writes ``{"enabled": false}``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lgeo_jax.analysis import analyze_crosscoder, live_sae_rows
from lgeo_jax.corpus import BASE_NAME, CorpusSource, open_corpus
from lgeo_jax.crosscoder import PairSource, crosscoder_health, initial_decoder, train_crosscoders
from lgeo_jax.files import atomic_write_json, atomic_write_npz
from lgeo_jax.sae import StackedSource, load_sae
from lgeo_jax.stages._layout import corpus_store, delta_sae_dir, sae_mesh
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig


def crosscoder_reads(config: StudyConfig) -> dict[str, Any]:
    """What the stage reads outside its own and its inputs' sections."""
    return {"analysis.eval_split": config.analysis.eval_split, "analysis.live_density": config.analysis.live_density,
            "analysis.null_samples": config.analysis.null_samples, "analysis.null_seed": config.analysis.null_seed,
            "analysis.n_boot": config.analysis.n_boot, "analysis.confidence": config.analysis.confidence}


def crosscoder_results_path(stage_dir: Path) -> Path:
    return stage_dir / "results.json"


def crosscoder_arrays_path(stage_dir: Path, name: str) -> Path:
    return stage_dir / "arrays" / f"{name}.npz"


def _init_seed(seed: int, adapter: str, layer: int) -> int:
    """Distinct from every SAE's initialisation (`_saes.init_seed` hashes the bare array name)."""
    return (seed * 1_000_003 + zlib.crc32(f"crosscoder/{adapter}/L{layer}".encode())) % 2**31


def run_crosscoders(config: StudyConfig, stage: StageRun, run: Run) -> None:
    cc_cfg, eval_split = config.crosscoder, config.analysis.eval_split
    if not cc_cfg.enabled:
        atomic_write_json(crosscoder_results_path(stage.path), {"enabled": False, "crosscoders": []})
        stage.update(crosscoders=0)
        return
    corpus = open_corpus(corpus_store(config, run))
    ranks = dict(zip(config.lora.names, config.lora.ranks, strict=True))
    pairs = [(name, layer) for name in config.lora.names for layer in config.extract.layers]
    parts, entries = [], []  # one PairSource per seed: its own row order, shared by the base and delta reads
    for seed in cc_cfg.seeds:
        names = [f"r{ranks[name]}_L{layer}_s{seed}" for name, layer in pairs]
        entries += [(n, name, layer, seed) for n, (name, layer) in zip(names, pairs, strict=True)]
        base = CorpusSource(corpus, config.sae.train_split, [(BASE_NAME, layer) for _, layer in pairs], names=names,
                            held_out_split=eval_split, seed=seed)
        delta = CorpusSource(corpus, config.sae.train_split, pairs, names=names, held_out_split=eval_split,
                             seed=seed)
        parts.append((base, delta))
    seeds = [_init_seed(seed, name, layer) for _, name, layer, seed in entries]
    try:
        source = StackedSource([PairSource(b, d) for b, d in parts])
        result = train_crosscoders(source, cc_cfg, seeds, stage.path / "job", mesh=sae_mesh(config))
        held = source.held_out(cc_cfg.eval_rows) if cc_cfg.eval_rows > 0 else None  # [C, N, 2D]
    finally:
        for b, d in parts:
            b.close()
            d.close()
    if held is None:
        raise ValueError("crosscoder.eval_rows is 0: the crosscoder analysis needs held-out rows; set it > 0")
    records = []
    (stage.path / "arrays").mkdir(exist_ok=True)
    for i, ((name, adapter, layer, seed), init, cc, metrics) in enumerate(zip(entries, seeds, result.crosscoders,
                                                                             result.final_metrics, strict=True)):
        sae_dir = delta_sae_dir(run, ranks[adapter], layer, seed)
        d = corpus.d_model  # the delta SAE's live rows on the crosscoder's held-out deltas (no SAE: seed not trained)
        sae_rows = (live_sae_rows(load_sae(sae_dir), held[i][:, d:] - held[i][:, :d], config.analysis.live_density)
                    if sae_dir.is_dir() else None)
        record, arrays = analyze_crosscoder(cc, held[i], sae_rows, null_samples=config.analysis.null_samples,
                                            seed=config.analysis.null_seed, n_boot=config.analysis.n_boot,
                                            level=config.analysis.confidence)
        health = crosscoder_health(cc, initial_decoder(corpus.d_model, cc_cfg, init), metrics)
        records.append({"name": name, "adapter": adapter, "rank": ranks[adapter], "layer": layer, "seed": seed,
                        "health": health.to_json(), "heldout_fvu": metrics.get("heldout_fvu"), **record})
        atomic_write_npz(crosscoder_arrays_path(stage.path, name),
                         {k: np.asarray(v, np.float64 if v.dtype.kind == "f" else np.int64) for k, v in arrays.items()})
    atomic_write_json(crosscoder_results_path(stage.path), {"enabled": True, "architecture": cc_cfg.architecture.value,
                                                            "width": cc_cfg.width, "crosscoders": records,
                                                            "thresholds": [cc_cfg.base_only_max, *cc_cfg.shared_range,
                                                                           cc_cfg.adapter_only_min]})
    stage.update(crosscoders=len(records), unhealthy=sum(not r["health"]["healthy"] for r in records))
