"""The `analysis` stage: Tables 4-12 with null baselines, from the corpus and the SAEs, into `results.json`.

Reads the corpus store and its `stats.json` (`corpus`), the delta / base SAEs and the L1 sweep (`saes`), and
each layer's reference dictionary: `analysis.dictionary_dirs`, a downloaded Gemma Scope, or the run's base SAE.
Works layer by layer (one unit per layer: `layers/L<l>.json` + `layers/L<l>.npz` with the raw max-cosines
and angles for the plots, written atomically, then marked done), so a killed stage resumes at the next
layer. `results.json` gathers the units with Table 4, Table 12 and what the report must flag.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lgeo_jax.analysis import LayerSAEs, NullCache, analyze_layer, table4, table12
from lgeo_jax.corpus import BASE_NAME, Corpus, load_stats, open_corpus
from lgeo_jax.files import atomic_write_json, atomic_write_npz
from lgeo_jax.sae import SAE, load_sae
from lgeo_jax.stages._layout import (
    base_sae_dir,
    corpus_store,
    delta_sae_dir,
    layer_arrays_path,
    results_path,
    sweep_path,
)
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig

BATCH_ROWS = 1024  # evaluation tokens per device batch (rounded up to whole corpus chunks)


def reference_path(config: StudyConfig, run: Run, layer: int) -> Path:
    """Where `layer`'s reference dictionary lives: `analysis.dictionary_dirs`, else Gemma Scope's `params.npz`,
    else (no external dictionary) the run's base SAE of the first seed; errors name the layer and path."""
    analysis = config.analysis
    if layer in analysis.dictionary_dirs:
        return Path(analysis.dictionary_dirs[layer])
    if analysis.gemma_scope_dir is None:
        return base_sae_dir(run, layer, config.sae.seeds[0])
    if layer not in analysis.gemma_scope_l0:
        raise ValueError(f"layer {layer}: no Gemma Scope L0 variant configured (analysis.gemma_scope_l0)")
    path = Path(analysis.gemma_scope_dir) / analysis.gemma_scope_params(layer)
    if not path.is_file():
        width_dir = path.parent.parent
        have = sorted(p.name for p in width_dir.iterdir()) if width_dir.is_dir() else []
        raise ValueError(f"layer {layer}: Gemma Scope SAE {path} not found ({width_dir} holds "
                         f"{have or 'nothing'}); download layer_{layer} or change analysis.gemma_scope_l0")
    return path


def _load(path: Path, what: str) -> SAE:
    if not path.exists():
        raise ValueError(f"{what}: {path} not found; run the saes stage to completion")
    return load_sae(path)


def load_layer_saes(config: StudyConfig, run: Run, layer: int) -> LayerSAEs:
    """The dictionary, every seed's delta SAE per adapter, and the base SAEs usable for base-base."""
    own = not config.analysis.has_external_dictionary(layer)  # then base seed 0 *is* the dictionary
    what = (f"analysis.dictionary_dirs.{layer}" if layer in config.analysis.dictionary_dirs else
            f"base SAE layer {layer} seed {config.sae.seeds[0]} (the reference dictionary)" if own else
            f"Gemma Scope layer {layer}")
    dictionary = _load(reference_path(config, run, layer), what)
    seeds = config.sae.seeds
    delta = {name: {s: _load(delta_sae_dir(run, rank, layer, s), f"delta SAE {name} layer {layer} seed {s}")
                    for s in seeds}
             for name, rank in zip(config.lora.names, config.lora.ranks, strict=True)}
    base_seeds = seeds[1:] if own else (seeds if config.sae.base_saes else ())
    base = {s: _load(base_sae_dir(run, layer, s), f"base SAE layer {layer} seed {s}") for s in base_seeds}
    return LayerSAEs(dictionary, delta, base)


def _batches(corpus: Corpus, split: str, layer: int, names: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
    n = corpus.n_rows(split)
    chunk = corpus.layout.chunk_rows
    step = max(chunk, -(-BATCH_ROWS // chunk) * chunk)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        yield tuple(corpus.rows(split, name, layer, rows) for name in names)


def run_analysis(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Computes every layer not yet done, then writes `results.json`."""
    corpus = open_corpus(corpus_store(config, run))
    stats = load_stats(run.stage_dir("corpus"))
    split = config.analysis.eval_split
    if split not in corpus.splits:
        raise ValueError(f"analysis.eval_split '{split}' is not in the corpus (splits: {list(corpus.splits)})")
    if corpus.n_rows(split) == 0:
        raise ValueError(f"corpus split '{split}' (analysis.eval_split) has no tokens in {corpus.url}; widen the "
                         f"data.{split} range or change analysis.eval_split")
    adapters = config.lora.names
    missing = [a for a in adapters if a not in corpus.layout.adapters]
    if missing:
        raise ValueError(f"corpus {corpus.url} has no deltas for adapters {missing}; rerun the corpus stage")
    nulls = NullCache(config.analysis)
    dictionaries = {}
    for layer in config.extract.layers:
        unit = f"L{layer}"
        dictionaries[unit] = str(reference_path(config, run, layer))
        if stage.is_done(unit):
            continue
        record, arrays = analyze_layer(
            layer, corpus.d_model, load_layer_saes(config, run, layer),
            base_batches=lambda layer=layer: (b for (b,) in _batches(corpus, split, layer, (BASE_NAME,))),
            pair_batches=lambda name, layer=layer: _batches(corpus, split, layer, (BASE_NAME, name)),
            config=config.analysis, nulls=nulls)
        layer_arrays_path(run, layer).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_npz(layer_arrays_path(run, layer), arrays)
        atomic_write_json(layer_arrays_path(run, layer).with_suffix(".json"), record)
        stage.mark_done(unit)

    layers = {f"L{layer}": json.loads(layer_arrays_path(run, layer).with_suffix(".json").read_text())
              for layer in config.extract.layers}
    sweep = sweep_path(run)
    atomic_write_json(results_path(run), {
        "meta": {
            "adapters": list(adapters), "ranks": list(config.lora.ranks), "layers": list(config.extract.layers),
            "d_model": corpus.d_model, "eval_split": split, "eval_tokens": corpus.n_rows(split),
            "sae_train_split": config.sae.train_split, "sae_seeds": list(config.sae.seeds),
            "probe_overlaps_train": config.data.probe_overlaps_train,
            "activation_dtype": stats.get("activation_dtype"), "store_dtype": stats.get("store_dtype"),
            "dictionary": (f"Gemma Scope ({config.analysis.gemma_scope_dir}, {config.analysis.gemma_scope_width})"
                           if config.analysis.gemma_scope_dir else
                           f"the run's own base SAE (seed {config.sae.seeds[0]}); no Gemma Scope")
            + (f"; per-layer SAE directories for layers {sorted(config.analysis.dictionary_dirs)}"
               if config.analysis.dictionary_dirs else ""),
            "dictionary_paths": dictionaries,
            "subspace_k": config.analysis.subspace_k, "near_orthogonal_deg": config.analysis.near_orthogonal_deg,
            "aligned_deg": config.analysis.aligned_deg, "active_threshold": config.analysis.active_threshold,
            "null_samples": config.analysis.null_samples,
            # what the saes stage used (the configured one, or the sweep's pick when sae.l1 is null)
            "sae_l1": run.manifest("saes").progress.get("l1", config.sae.l1),
        },
        "table4": table4(stats, adapters, config.extract.layers),
        "layers": layers,
        "table12": table12(json.loads(sweep.read_text())) if sweep.is_file() else None,
    })
