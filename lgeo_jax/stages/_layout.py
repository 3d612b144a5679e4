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

from lgeo_jax.corpus import store_url
from lgeo_jax.data import AlpacaRecord, load_alpaca
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
