"""What the stages hand each other: paths inside the run directory and the objects built from them.

Every stage reads its inputs through these functions, so the on-disk layout of a run is defined once:
  data/records.json       all records (Alpaca JSON list; the synthetic default or a copy of the real set)
  data/tokenizer/         tokenizer directory for AutoTokenizer (synthetic default only)
  base/model/             HF Gemma-2 checkpoint (builtin tiny model only; real runs use model.checkpoint)
  adapters/<name>/        one PEFT LoRA directory per rank (name: r4, r8, ...)
"""

from __future__ import annotations

import json
from pathlib import Path

from lgeo_jax.config import StudyConfig
from lgeo_jax.data import AlpacaRecord, SplitConfig, TokenizeConfig, load_alpaca
from lgeo_jax.manifest import Run
from lgeo_jax.model import Gemma2Config, alternating_layer_types


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


def builtin_model_config(config: StudyConfig, vocab_size: int) -> Gemma2Config:
    """The built-in tiny model's architecture: Gemma-2's alternating local (even layers) / global attention."""
    b = config.model.builtin
    return Gemma2Config(**b.gemma2_kwargs(vocab_size), layer_types=alternating_layer_types(b.n_layers))


def base_checkpoint(run: Run, config: StudyConfig) -> Path:
    """The base model's HF directory: the one `lgeo` built and pretrained, or the user's checkpoint."""
    return run.stage_dir("base") / "model" if config.model.is_builtin else Path(config.model.checkpoint)


def adapter_names(config: StudyConfig) -> list[str]:
    return [f"r{r}" for r in config.lora.ranks]


def adapter_dirs(run: Run, config: StudyConfig) -> list[Path]:
    return [run.stage_dir("adapters") / name for name in adapter_names(config)]


def split_config(config: StudyConfig) -> SplitConfig:
    return SplitConfig(train=config.data.train, probe=config.data.probe, heldout=config.data.heldout)


def tokenize_config(config: StudyConfig) -> TokenizeConfig:
    return TokenizeConfig(max_length=config.data.max_length, loss_on=config.data.loss_on,
                          overflow=config.data.overflow)


# ---- SAEs (written by the `saes` stage) ------------------------------------------------------------
# saes/job/saes/r{R}_L{L}_s{seed}/  delta SAE for adapter rank R at layer L (lgeo_jax.sae.save_sae format)
# saes/job/saes/base_L{L}_s{seed}/  SAE on h_base at layer L (base-base baseline; the dictionary for builtin runs)
# saes/gemma_scope/layer_{L}/width_{W}/average_l0_{N}/params.npz
#                                 the base SAEs (seed 0) exported in the Gemma Scope layout (N = their measured
#                                 held-out L0), used as the "Gemma Scope" dictionary when the config gives no
#                                 gemma_scope_dir; saes/gemma_scope/l0.json maps layer -> N
# saes/sweep.json                 the L1 sweep (Table 12): {"adapter", "layer", "selected_l1", "points": [SweepPoint]}
def delta_sae_name(rank: int, layer: int, seed: int) -> str:
    return f"r{rank}_L{layer}_s{seed}"


def base_sae_name(layer: int, seed: int) -> str:
    return f"base_L{layer}_s{seed}"


def delta_sae_dir(run: Run, rank: int, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "job" / "saes" / delta_sae_name(rank, layer, seed)


def base_sae_dir(run: Run, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "job" / "saes" / base_sae_name(layer, seed)


def gemma_scope_root(run: Run, config: StudyConfig) -> Path:
    """The Gemma Scope-layout directory the analysis compares against."""
    if config.analysis.gemma_scope_dir:
        return Path(config.analysis.gemma_scope_dir)
    return run.stage_dir("saes") / "gemma_scope"


def gemma_scope_params(run: Run, config: StudyConfig, layer: int) -> Path:
    """`params.npz` of the dictionary for `layer`: the configured Gemma Scope L0 variant, or our base-SAE export."""
    if config.analysis.gemma_scope_dir:
        return Path(config.analysis.gemma_scope_dir) / config.analysis.gemma_scope_params(layer)
    root = gemma_scope_root(run, config)
    l0 = json.loads((root / "l0.json").read_text())[str(layer)]
    return root / f"layer_{layer}" / config.analysis.gemma_scope_width / f"average_l0_{l0}" / "params.npz"


def sweep_path(run: Run) -> Path:
    return run.stage_dir("saes") / "sweep.json"
