"""The `saes` stage: every delta SAE (adapter x layer x seed) and base SAE (layer x seed) in ONE vmapped,
sharded job over the corpus, the L1 sweep (Table 12) as a second job, and the Gemma Scope-layout export
of the base SAEs that builtin runs use as their reference dictionary.

Both jobs checkpoint inside the stage directory (orbax, exact resume), so a killed stage continues.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

from lgeo_jax.config import Schedule, StudyConfig
from lgeo_jax.corpus import BASE_NAME, CorpusSource, open_corpus
from lgeo_jax.manifest import Run, StageRun, atomic_write_json
from lgeo_jax.sae import (
    SAEConfig,
    TrainConfig,
    l1_sweep,
    load_sae,
    pick_l1,
    read_metrics,
    train_saes,
    write_gemma_scope,
)
from lgeo_jax.stages._corpus import corpus_store
from lgeo_jax.stages._inputs import (
    adapter_names,
    base_sae_dir,
    base_sae_name,
    delta_sae_name,
    gemma_scope_root,
    sweep_path,
)

_DECAY = {Schedule.CONSTANT: 0.0, Schedule.LINEAR: 0.2}  # fraction of steps with linear LR decay at the end


def sae_configs(config: StudyConfig, d_model: int) -> tuple[SAEConfig, TrainConfig]:
    s = config.sae
    if s.lr_schedule not in _DECAY:
        raise ValueError(f"sae.lr_schedule {s.lr_schedule.value!r} is not supported for SAEs; use "
                         f"{' or '.join(repr(k.value) for k in _DECAY)}")
    sae_cfg = SAEConfig(d_in=d_model, d_sae=s.resolved_width(d_model), arch=s.architecture.value, k=s.k or 0)
    train_cfg = TrainConfig(batch_size=s.batch_size, lr=s.lr, epochs=s.epochs or 0, token_budget=s.token_budget or 0,
                            lr_warmup_steps=s.lr_warmup_steps, lr_decay_fraction=_DECAY[s.lr_schedule],
                            l1_warmup_steps=s.l1_warmup_steps, checkpoint_every=s.checkpoint_every)
    return sae_cfg, train_cfg


def init_seed(seed: int, array: str, layer: int) -> int:
    """A distinct initialisation per (seed, corpus array): SAEs that share a config seed must not share their
    random start, or delta-vs-base geometry would partly measure the common initial decoder."""
    return (seed * 1_000_003 + zlib.crc32(f"{array}/L{layer}".encode())) % 2**31


def run_saes(config: StudyConfig, stage: StageRun, run: Run) -> None:
    corpus = open_corpus(corpus_store(config, run))
    s, layers, split = config.sae, config.extract.layers, config.sae.train_split
    heldout = config.analysis.eval_split
    sae_cfg, train_cfg = sae_configs(config, corpus.d_model)
    ranks = dict(zip(adapter_names(config), config.lora.ranks, strict=True))
    l1 = s.l1
    if s.l1_sweep:  # Table 12 on (first adapter, first layer), as the paper's layer 5 / rank 4 sweep
        name, layer = next(iter(ranks)), layers[0]
        x = corpus.split_rows(split, name, layer)
        held = corpus.split_rows(heldout, name, layer)[: train_cfg.eval_rows]
        points = l1_sweep(x, s.l1_sweep, sae_cfg, train_cfg, stage.path / "sweep", held_out=held,
                          seed=init_seed(s.seeds[0], name, layer), plot=config.report.plots)
        chosen = pick_l1(points, tuple(s.l0_target))
        l1 = chosen.l1_coeff if l1 is None else l1
        atomic_write_json(sweep_path(run), {
            "adapter": name, "layer": layer, "l0_target": list(s.l0_target), "selected_l1": chosen.l1_coeff,
            "used_l1": l1, "points": [dataclasses.asdict(p) for p in points]})
    arrays, names, seeds = [], [], []
    for name, rank in ranks.items():
        for layer in layers:
            for seed in s.seeds:
                arrays.append((name, layer))
                names.append(delta_sae_name(rank, layer, seed))
                seeds.append(init_seed(seed, name, layer))
    exported = [layer for layer in layers if not config.analysis.has_external_dictionary(layer)]
    if s.base_saes or exported:
        for layer in layers:
            for seed in s.seeds:
                arrays.append((BASE_NAME, layer))
                names.append(base_sae_name(layer, seed))
                seeds.append(init_seed(seed, BASE_NAME, layer))
    with CorpusSource(corpus, split, arrays, names=names, held_out_split=heldout) as source:
        train_saes(source, sae_cfg, train_cfg, [l1] * len(names), seeds, stage.path / "job", plot=config.report.plots)
        tokens = train_cfg.total_steps(source.n_rows) * train_cfg.batch_size
    stage.update(saes=len(names), l1=l1, tokens_per_sae=tokens)
    if exported:
        _export_reference(config, run, exported)


def _export_reference(config: StudyConfig, run: Run, layers) -> None:
    """Base SAEs (first seed) in the Gemma Scope layout, folder named by their measured held-out L0."""
    root = gemma_scope_root(run, config)
    metrics = {m["name"]: m for m in _last_metrics(run)}
    l0 = {}
    for layer in layers:
        name = base_sae_name(layer, config.sae.seeds[0])
        l0[str(layer)] = int(round(metrics[name].get("heldout_l0", metrics[name]["l0"])))
        out = root / f"layer_{layer}" / config.analysis.gemma_scope_width / f"average_l0_{l0[str(layer)]}"
        write_gemma_scope(load_sae(base_sae_dir(run, layer, config.sae.seeds[0])), out)
    (root / "l0.json").write_text(json.dumps(l0, indent=2))


def _last_metrics(run: Run) -> list[dict]:
    """The job's final logged row per SAE (from the CSV, so a resumed, already finished job has them too)."""
    rows = read_metrics(run.stage_dir("saes") / "job" / "metrics.csv")
    last_step = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last_step]
