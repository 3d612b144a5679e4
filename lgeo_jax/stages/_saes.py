"""The `saes` stage: every delta SAE (adapter x layer x seed) and base SAE (layer x seed) in ONE vmapped,
sharded job over the corpus, and the L1 sweep (Table 12) as a second job. Base SAEs are trained when
`sae.base_saes` asks for the base-base baseline, and always for a layer the config gives no reference
dictionary for (Gemma Scope or `analysis.dictionary_dirs`): the first seed's base SAE is then its reference.

Both jobs checkpoint inside the stage directory (orbax, exact resume), so a killed stage continues.
"""

from __future__ import annotations

import dataclasses
import zlib

from lgeo_jax.corpus import BASE_NAME, CorpusSource, open_corpus
from lgeo_jax.files import atomic_write_json
from lgeo_jax.sae import Arch, l1_sweep, pick_l1, train_saes
from lgeo_jax.stages._layout import base_sae_name, corpus_store, delta_sae_name, sweep_path
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig


def init_seed(seed: int, array: str, layer: int) -> int:
    """A distinct initialisation per (seed, corpus array): SAEs that share a config seed must not share their
    random start, or delta-vs-base geometry would partly measure the common initial decoder."""
    return (seed * 1_000_003 + zlib.crc32(f"{array}/L{layer}".encode())) % 2**31


def run_saes(config: StudyConfig, stage: StageRun, run: Run) -> None:
    corpus = open_corpus(corpus_store(config, run))
    s, layers, split = config.sae, config.extract.layers, config.sae.train_split
    heldout = config.analysis.eval_split
    sae_cfg = s.sae_config(corpus.d_model)
    ranks = dict(zip(config.lora.names, config.lora.ranks, strict=True))
    l1 = s.l1 if s.architecture is Arch.RELU else 0.0  # TopK: k sets the sparsity, no penalty
    if s.l1_sweep:  # Table 12 on (first adapter, first layer), as the paper's layer 5 / rank 4 sweep
        name, layer = next(iter(ranks)), layers[0]
        x = corpus.split_rows(split, name, layer)
        held = corpus.split_rows(heldout, name, layer)[: s.eval_rows]
        points = l1_sweep(x, s.l1_sweep, sae_cfg, s, stage.path / "sweep", held_out=held,
                          seed=init_seed(s.seeds[0], name, layer), plot=config.report.plots)
        chosen = pick_l1(points, tuple(s.l0_target))
        l1 = chosen.l1_coeff if l1 is None else l1
        atomic_write_json(sweep_path(run), {
            "adapter": name, "layer": layer, "l0_target": list(s.l0_target), "selected_l1": chosen.l1_coeff,
            "used_l1": l1, "normalize": s.normalize.value, "points": [dataclasses.asdict(p) for p in points]})
    arrays, names, seeds = [], [], []
    for name, rank in ranks.items():
        for layer in layers:
            for seed in s.seeds:
                arrays.append((name, layer))
                names.append(delta_sae_name(rank, layer, seed))
                seeds.append(init_seed(seed, name, layer))
    if s.base_saes or not all(config.analysis.has_external_dictionary(layer) for layer in layers):
        for layer in layers:
            for seed in s.seeds:
                arrays.append((BASE_NAME, layer))
                names.append(base_sae_name(layer, seed))
                seeds.append(init_seed(seed, BASE_NAME, layer))
    with CorpusSource(corpus, split, arrays, names=names, held_out_split=heldout) as source:
        train_saes(source, sae_cfg, s, [l1] * len(names), seeds, stage.path / "job", plot=config.report.plots)
        tokens = s.total_steps(source.n_rows) * s.batch_size
    stage.update(saes=len(names), l1=l1, tokens_per_sae=tokens)
