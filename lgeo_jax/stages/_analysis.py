"""The `analysis` stage: Tables 2 and 4-12 with intervals and null baselines, from the corpus and the SAEs,
into `results.json`.

Reads the corpus store and its `stats.json` (`corpus`), the delta / base SAEs, the L1 sweep and the SAEs'
training health (`saes`), the adapters' summary (Table 2) and LoRA factors (the write span of the LoRA-span
linkage), and each layer's reference dictionary:
`analysis.dictionary_dirs`, a downloaded Gemma Scope, or the run's base SAE. Works layer by layer (one
unit per layer: `layers/L<l>.json` + `layers/L<l>.npz` with the raw max-cosines, angles, spectra and
per-prompt L0 sums, written atomically, then marked done), so a killed stage resumes at the next layer.
Per layer it reads the evaluation split into memory (h_base and one adapter's delta at a time: the CKA
intervals and the whole-split shuffled nulls need every token) and streams each SAE's training split
once to decide which latents are live. `results.json` gathers the units with Tables 2, 4 (all splits),
12, the density trends, the training health and what the report must flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lgeo_jax.analysis import (
    DeviceSAE,
    LayerSAEs,
    NullCache,
    analyze_layer,
    density_trends,
    firing_counts,
    lora_span,
    table2,
    table4,
    table12,
)
from lgeo_jax.corpus import BASE_NAME, Corpus, load_stats, open_corpus
from lgeo_jax.files import atomic_write_json, atomic_write_npz, read_json
from lgeo_jax.lora import load_adapter
from lgeo_jax.model import Gemma2Config, abstract_model, count_params
from lgeo_jax.sae import SAE, load_sae
from lgeo_jax.stages._layout import (
    adapter_dirs,
    base_sae_dir,
    corpus_store,
    delta_sae_dir,
    health_path,
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


def _batches(corpus: Corpus, split: str, name: str, layer: int) -> Iterator[np.ndarray]:
    """Rows [B, D] of one array, whole corpus chunks at a time."""
    n = corpus.n_rows(split)
    chunk = corpus.layout.chunk_rows
    step = max(chunk, -(-BATCH_ROWS // chunk) * chunk)
    for start in range(0, n, step):
        yield corpus.rows(split, name, layer, slice(start, min(n, start + step)))


def dictionary_kind(config: StudyConfig, layer: int) -> str:
    """What the reference dictionary of `layer` is: `dictionary_dir`, `gemma_scope` or `own_base_sae`."""
    if layer in config.analysis.dictionary_dirs:
        return "dictionary_dir"
    return "gemma_scope" if config.analysis.gemma_scope_dir is not None else "own_base_sae"


def _total_params(config: StudyConfig, run: Run) -> int | None:
    """The base model's parameter count (Table 2's denominator)."""
    if config.model.is_builtin:
        return run.manifest("base").progress.get("n_params")
    cfg = Gemma2Config.from_hf_dir(config.model.checkpoint)
    return count_params(abstract_model(cfg))


def _firing(corpus: Corpus, split: str, layer: int, saes: LayerSAEs, bar) -> dict:
    """Every SAE's per-latent firing counts on the split it was trained on (one read of each array)."""
    by_array: dict[str | None, dict[str, DeviceSAE]] = {}
    for key, (array, sae) in saes.training_arrays().items():
        by_array.setdefault(array, {})[key] = DeviceSAE(sae)
    out = {}
    for array, devices in by_array.items():
        out |= firing_counts(_batches(corpus, split, array or BASE_NAME, layer), devices, on_batch=bar.update)
    return out


def run_analysis(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Computes every layer not yet done, then writes `results.json`."""
    corpus = open_corpus(corpus_store(config, run))
    stats = load_stats(run.stage_dir("corpus"))
    a = config.analysis
    split, train_split = a.eval_split, config.sae.train_split
    for name in (split, train_split):
        if name not in corpus.splits:
            raise ValueError(f"split '{name}' (analysis.eval_split / sae.train_split) is not in the corpus (splits: "
                             f"{list(corpus.splits)})")
    if corpus.n_rows(split) == 0:
        raise ValueError(f"corpus split '{split}' (analysis.eval_split) has no tokens in {corpus.url}; widen the "
                         f"data.{split} range or change analysis.eval_split")
    adapters = config.lora.names
    missing = [name for name in adapters if name not in corpus.layout.adapters]
    if missing:
        raise ValueError(f"corpus {corpus.url} has no deltas for adapters {missing}; rerun the corpus stage")
    nulls = NullCache(a.null_samples, a.null_seed, near_orthogonal=a.near_orthogonal_deg, aligned=a.aligned_deg,
                      chunk=a.max_cosine_chunk)
    # the LoRA factors, for the subspace each adapter can write into the residual stream (`lora_span`)
    factors = {name: load_adapter(path) for name, path in zip(adapters, adapter_dirs(run, config), strict=True)}
    todo = [layer for layer in config.extract.layers if not stage.is_done(f"L{layer}")]
    n_train_arrays = len(adapters) + 1
    total = len(todo) * (corpus.n_rows(train_split) * n_train_arrays + corpus.n_rows(split) * len(adapters))
    dictionaries = {}
    with tqdm(total=total, desc="analysis", unit="tok", unit_scale=True, mininterval=1.0) as bar:
        for layer in config.extract.layers:
            unit = f"L{layer}"
            dictionaries[unit] = {"path": str(reference_path(config, run, layer)),
                                  "kind": dictionary_kind(config, layer)}
            if stage.is_done(unit):
                continue
            bar.set_postfix_str(f"layer {layer}: live latents on {train_split}")
            saes = load_layer_saes(config, run, layer)
            firing = _firing(corpus, train_split, layer, saes, bar)
            sample_index = corpus.meta(split)["sample_index"].astype(np.int64)
            record, arrays = analyze_layer(
                layer, saes, corpus.split_rows(split, BASE_NAME, layer), sample_index,
                delta_of=lambda name, layer=layer: corpus.split_rows(split, name, layer), firing=firing, config=a,
                nulls=nulls, spans={name: lora_span(f, layer, corpus.d_model, rtol=a.span_rtol)
                                    for name, f in factors.items()}, on_tokens=bar.update,
                on_phase=lambda text, layer=layer: bar.set_postfix_str(f"layer {layer}: {text}"))
            layer_arrays_path(run, layer).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_npz(layer_arrays_path(run, layer), arrays)
            atomic_write_json(layer_arrays_path(run, layer).with_suffix(".json"), record)
            stage.mark_done(unit)

    layers = {f"L{layer}": read_json(layer_arrays_path(run, layer).with_suffix(".json"), needed_by="analysis")
              for layer in config.extract.layers}
    per_layer = {}
    for layer in config.extract.layers:
        with np.load(layer_arrays_path(run, layer), allow_pickle=False) as npz:
            per_layer[layer] = {k: npz[k] for k in npz.files if k.startswith("prompt") or k.endswith("/prompt_l0")}
    sweep, health = sweep_path(run), health_path(run)
    summary = run.stage_dir("adapters") / "summary.json"
    kinds = {d["kind"] for d in dictionaries.values()}
    atomic_write_json(results_path(run), {
        "meta": {
            "adapters": list(adapters), "ranks": list(config.lora.ranks), "layers": list(config.extract.layers),
            "d_model": corpus.d_model, "eval_split": split, "eval_tokens": corpus.n_rows(split),
            "eval_prompts": int(np.unique(corpus.meta(split)["sample_index"]).size),
            "sae_train_split": train_split, "sae_train_tokens": corpus.n_rows(train_split),
            "sae_seeds": list(config.sae.seeds),
            "probe_overlaps_train": config.data.probe_overlaps_train,
            "builtin_model": config.model.is_builtin, "checkpoint": str(config.model.checkpoint),
            "activation_dtype": stats.get("activation_dtype"), "store_dtype": stats.get("store_dtype"),
            "dictionary": _dictionary_text(config, kinds), "dictionary_kind": sorted(kinds),
            "dictionary_paths": dictionaries,
            "subspace_k": a.subspace_k, "k_sweep": list(a.k_sweep), "near_orthogonal_deg": a.near_orthogonal_deg,
            "aligned_deg": a.aligned_deg, "active_threshold": a.active_threshold, "live_density": a.live_density,
            "null_samples": a.null_samples, "n_boot": a.n_boot, "subspace_boot": a.subspace_boot,
            "confidence": a.confidence,
            # what the saes stage used (the configured one, or the sweep's pick when sae.l1 is null)
            "sae_l1": run.manifest("saes").progress.get("l1", config.sae.l1),
        },
        "table2": (table2(read_json(summary, needed_by="Table 2"), adapters, _total_params(config, run))
                   if summary.is_file() else None),
        "table4": table4(stats, adapters, config.extract.layers),
        "layers": layers,
        "density_trends": density_trends(adapters, config.lora.ranks, config.extract.layers, per_layer,
                                         n_boot=a.n_boot, seed=a.boot_seed, level=a.confidence),
        "table12": table12(read_json(sweep, needed_by="Table 12")) if sweep.is_file() else None,
        "health": read_json(health, needed_by="the training-health table") if health.is_file() else None,
    })


def _dictionary_text(config: StudyConfig, kinds: set[str]) -> str:
    """The reference dictionary in words, true to what it is (Gemma Scope only when it is)."""
    parts = []
    if "gemma_scope" in kinds:
        parts.append(f"Gemma Scope ({config.analysis.gemma_scope_dir}, {config.analysis.gemma_scope_width})")
    if "own_base_sae" in kinds:
        parts.append(f"the run's own base SAE (seed {config.sae.seeds[0]}, trained on h_base); not Gemma Scope")
    if "dictionary_dir" in kinds:
        parts.append(f"per-layer SAE directories for layers {sorted(config.analysis.dictionary_dirs)}")
    return "; ".join(parts)
