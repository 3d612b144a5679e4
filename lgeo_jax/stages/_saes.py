"""The `saes` stage: every delta SAE (adapter x layer x seed) and base SAE (layer x seed) in ONE vmapped,
sharded job over the corpus, after the L1 sweep (Table 12) as jobs of their own. Base SAEs are trained when
`sae.base_saes` asks for the base-base baseline, and always for a layer the config gives no reference
dictionary for (Gemma Scope or `analysis.dictionary_dirs`): the first seed's base SAE is then its reference.
Each config seed reads the training split in its own order (and starts from its own initialisation), so the
seed-to-seed baseline varies both.

With `sae.l1: null` the sweep must find a coefficient whose held-out L0 lies in `sae.l0_target`
(`lgeo_jax.sae.search_l1`); if none does, the stage fails with the L0s found and a grid to try, or, with
`sae.allow_off_target`, takes the nearest and records a warning. `saes/health.json` holds every trained SAE's
training health (`lgeo_jax.sae.sae_health`) and those warnings.

All jobs checkpoint inside the stage directory (orbax, exact resume), so a killed stage continues, also
after a job had finished (its final metrics are read back from its `metrics.csv`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import zlib

from lgeo_jax.corpus import BASE_NAME, CorpusSource, open_corpus
from lgeo_jax.files import atomic_write_json
from lgeo_jax.sae import Arch, StackedSource, initial_decoder, sae_health, search_l1, train_saes
from lgeo_jax.stages._layout import base_sae_name, corpus_store, delta_sae_name, health_path, sae_mesh, sweep_path
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig

log = logging.getLogger("lgeo")


def init_seed(seed: int, array: str, layer: int) -> int:
    """A distinct initialisation per (seed, corpus array): SAEs that share a config seed must not share their
    random start, or delta-vs-base geometry would partly measure the common initial decoder."""
    return (seed * 1_000_003 + zlib.crc32(f"{array}/L{layer}".encode())) % 2**31


def trains_base_saes(config: StudyConfig) -> bool:
    """Base SAEs are trained for the base-base baseline (`sae.base_saes`), and whenever a layer has no external
    reference dictionary (the first seed's base SAE is then that layer's reference)."""
    return config.sae.base_saes or not all(config.analysis.has_external_dictionary(layer)
                                           for layer in config.extract.layers)


def _warn(message: str) -> None:
    log.warning("%s", message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _sweep(config: StudyConfig, stage: StageRun, run: Run, corpus, sae_cfg, warnings: list[str]) -> float | None:
    """Table 12 on (first adapter, first layer), as the paper's layer 5 / rank 4 sweep; returns the L1 the
    SAEs use (the configured one, or the sweep's on-target pick)."""
    s, layer, split = config.sae, config.extract.layers[0], config.sae.train_split
    name = config.lora.names[0]
    x = corpus.split_rows(split, name, layer)
    held = corpus.split_rows(config.analysis.eval_split, name, layer)[: s.eval_rows]
    picking = s.l1 is None
    found = search_l1(x, s.l1_sweep, sae_cfg, s, stage.path / "sweep", tuple(s.l0_target),
                      rounds=s.l1_sweep_rounds if picking else 0, held_out=held,
                      seed=init_seed(s.seeds[0], name, layer), mesh=sae_mesh(config), plot=config.report.plots)
    if picking and not found.on_target:
        if not s.allow_off_target:
            raise ValueError(found.off_target_message())
        warnings.append(f"off target (sae.allow_off_target): {found.off_target_message()}")
        _warn(warnings[-1])
    l1 = found.chosen.l1_coeff if picking else s.l1
    atomic_write_json(sweep_path(run), {
        "adapter": name, "layer": layer, "l0_target": list(s.l0_target), "selected_l1": found.chosen.l1_coeff,
        "used_l1": l1, "on_target": found.on_target, "rounds": found.rounds, "normalize": s.normalize.value,
        "points": [dataclasses.asdict(p) for p in found.points]})
    return l1


def run_saes(config: StudyConfig, stage: StageRun, run: Run) -> None:
    corpus = open_corpus(corpus_store(config, run))
    s, layers = config.sae, config.extract.layers
    sae_cfg = s.sae_config(corpus.d_model)
    warnings: list[str] = []
    l1 = s.l1 if s.architecture is Arch.RELU else 0.0  # the other architectures have no L1 penalty
    if s.l1_sweep:
        l1 = _sweep(config, stage, run, corpus, sae_cfg, warnings)
    arrays = [(name, layer) for name in config.lora.names for layer in layers]
    if trains_base_saes(config):
        arrays += [(BASE_NAME, layer) for layer in layers]
    ranks = dict(zip(config.lora.names, config.lora.ranks, strict=True))
    parts, entries = [], []  # one source per config seed: its own order over the same arrays
    for seed in s.seeds:
        names = [base_sae_name(layer, seed) if name == BASE_NAME else delta_sae_name(ranks[name], layer, seed)
                 for name, layer in arrays]
        entries += [(n, name, layer, seed) for n, (name, layer) in zip(names, arrays, strict=True)]
        parts.append(CorpusSource(corpus, s.train_split, arrays, names=names,
                                  held_out_split=config.analysis.eval_split, seed=seed))
    init_seeds = [init_seed(seed, name, layer) for _, name, layer, seed in entries]
    try:
        source = StackedSource(parts)
        result = train_saes(source, sae_cfg, s, [l1] * len(entries), init_seeds, stage.path / "job",
                            mesh=sae_mesh(config), plot=config.report.plots)
    finally:
        for part in parts:
            part.close()
    total = s.total_steps(source.n_rows)
    health = []
    for (sae_name, name, layer, seed), init, sae, metrics in zip(entries, init_seeds, result.saes,
                                                                 result.final_metrics, strict=True):
        h = sae_health(sae, initial_decoder(sae_cfg, init), metrics, tuple(s.l0_target))
        health.append({"name": sae_name, "adapter": "base" if name == BASE_NAME else name, "layer": layer,
                       "seed": seed, **h.to_json()})
    sick = [h["name"] for h in health if not h["healthy"]]
    if sick:
        _warn(f"{len(sick)} of {len(health)} SAEs are unhealthy ({', '.join(sick)}); see {health_path(run)}")
    atomic_write_json(health_path(run), {
        "d_in": corpus.d_model, "l0_target": list(s.l0_target),
        "dead_window_tokens": s.dead_window_steps(total) * s.batch_size, "saes": health, "warnings": warnings})
    stage.update(saes=len(entries), l1=l1, tokens_per_sae=total * s.batch_size, unhealthy=len(sick))
