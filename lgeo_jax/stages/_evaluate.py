"""The `evaluate` stage (optional: `splice.enabled`): splice evaluation of every (adapter, layer) on held-out
prompts, into `results.json`.

Reads the records and tokenizer (`data`), the base model and the adapters, the delta SAEs of the first seed
(`saes`) and each layer's reference dictionary (`analysis.dictionary_dirs`, Gemma Scope, or the run's base
SAE: `reference_path`, as the analysis stage compares with). On the first `splice.n_prompts` prompts of
`analysis.eval_split`, every adapted model runs with its residual at the layer replaced by each splice of
`lgeo_jax.analysis.SPLICES` (`lgeo_jax.lora.splice`: all adapters in one jitted call per batch), and the
target tokens' KL and cross-entropy go into per-prompt sums; `lgeo_jax.analysis.splice_record` turns them
into numbers with prompt-bootstrap intervals (the analysis section's `n_boot`, `boot_seed`, `confidence`).

One unit per layer (`layers/L<l>.json`, written atomically, then marked done), so a killed stage resumes at
the next layer. Output: ``results.json`` = ``{"enabled", "layers", "adapters", "ranks", "n_prompts",
"split", "activation_dtype", "cells": {adapter: {"L<l>": record}}}``; disabled, ``{"enabled": false}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lgeo_jax.analysis import SPLICES, splice_record, splice_sums, splices_for
from lgeo_jax.data import BatchConfig, collate, padded_length, tokenize_split
from lgeo_jax.files import atomic_write_json, read_json
from lgeo_jax.lora import load_adapter, splice
from lgeo_jax.model import load_model
from lgeo_jax.sae import load_sae
from lgeo_jax.stages._analysis import reference_path
from lgeo_jax.stages._layout import (
    adapter_dirs,
    base_checkpoint,
    delta_sae_dir,
    load_records,
    load_tokenizer,
    stage_mesh,
)
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig


def evaluate_reads(config: StudyConfig) -> dict[str, Any]:
    """What the stage reads outside its own and its inputs' sections: the prompts' split, the intervals' settings
    and what decides each layer's reference dictionary (an external one's file is fingerprinted too, `files`)."""
    return {"analysis.eval_split": config.analysis.eval_split, "analysis.n_boot": config.analysis.n_boot,
            "analysis.boot_seed": config.analysis.boot_seed, "analysis.confidence": config.analysis.confidence,
            "analysis.dictionary_dirs": dict(config.analysis.dictionary_dirs),
            "analysis.gemma_scope_dir": config.analysis.gemma_scope_dir}


def evaluate_results_path(stage_dir: Path) -> Path:
    return stage_dir / "results.json"


def _layer_path(stage_dir: Path, layer: int) -> Path:
    return stage_dir / "layers" / f"L{layer}.json"


def run_evaluate(config: StudyConfig, stage: StageRun, run: Run) -> None:
    s, split = config.splice, config.analysis.eval_split
    if not s.enabled:
        atomic_write_json(evaluate_results_path(stage.path), {"enabled": False})
        return
    examples = tokenize_split(load_records(run), load_tokenizer(run, config), config.data, split)[: s.n_prompts]
    if len(examples) < 2:
        raise ValueError(f"splice: split '{split}' (analysis.eval_split) has {len(examples)} prompt(s); the "
                         "prompt bootstrap needs at least 2 (widen the split or raise splice.n_prompts)")
    # one padded length for every batch: one compilation per layer
    batching = BatchConfig(batch_size=s.batch_size, shuffle=False,
                           bucket_boundaries=(padded_length(max(e.length for e in examples), BatchConfig(1)),))
    batches = [collate(examples[i:i + s.batch_size], batching) for i in range(0, len(examples), s.batch_size)]
    names, ranks = config.lora.names, config.lora.ranks
    base_dir = base_checkpoint(run, config)
    mesh = stage_mesh(config, base_dir)
    model = load_model(base_dir, dtype=config.model.param_dtype, mesh=mesh)
    adapters = [load_adapter(d, config=model.config, name=n, mesh=mesh)
                for d, n in zip(adapter_dirs(run, config), names, strict=True)]
    seed = config.sae.seeds[0]
    for layer in config.extract.layers:
        unit = f"L{layer}"
        if stage.is_done(unit):
            continue
        delta = []
        for rank in ranks:
            path = delta_sae_dir(run, rank, layer, seed)
            if not path.exists():
                raise ValueError(f"delta SAE rank {rank} layer {layer} seed {seed}: {path} not found; run the saes "
                                 "stage to completion")
            delta.append(load_sae(path))
        splices = splices_for(delta, load_sae(reference_path(config, run, layer)), random_seed=s.random_seed)
        sums = None
        for batch in batches:
            tokens = splice(model, adapters, batch.input_ids, layer=layer, splices=splices,
                            attention_mask=batch.attention_mask, loss_mask=batch.loss_mask,
                            dtype=config.model.residual_dtype)
            sums = splice_sums(tokens, batch.sample_index, names, into=sums)
        record = {name: splice_record(sums[name], n_boot=config.analysis.n_boot, seed=config.analysis.boot_seed,
                                      level=config.analysis.confidence) for name in names}
        _layer_path(stage.path, layer).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_layer_path(stage.path, layer), record)
        stage.mark_done(unit)
    layers = {layer: read_json(_layer_path(stage.path, layer), needed_by="the evaluate stage")
              for layer in config.extract.layers}
    atomic_write_json(evaluate_results_path(stage.path), {
        "enabled": True, "layers": list(config.extract.layers), "adapters": list(names), "ranks": list(ranks),
        "split": split, "n_prompts": len(examples), "splices": list(SPLICES), "sae_seed": seed,
        "activation_dtype": config.model.residual_dtype or str(model.embed[...].dtype),
        "cells": {name: {f"L{layer}": layers[layer][name] for layer in config.extract.layers} for name in names}})
    stage.update(cells=len(names) * len(config.extract.layers),
                 delta_beats_random=int(sum(layers[layer][name]["effect_recovered"]["delta_sae"]["vs_random"] == 1
                                            for layer in config.extract.layers for name in names)))
