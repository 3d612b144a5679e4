"""What the stages hand each other: paths inside the run directory and the objects built from them.

Every stage reads its inputs through these functions, so the on-disk layout of a run is defined once:
  data/records.json       all records (Alpaca JSON list; the synthetic default or a copy of the real set)
  data/tokenizer/         tokenizer directory for AutoTokenizer (synthetic default only)
  base/model/             HF Gemma-2 checkpoint (builtin tiny model only; real runs use model.checkpoint)
  adapters/<name>/        one PEFT LoRA directory per rank (name: r4, r8, ...)
"""

from __future__ import annotations

from pathlib import Path

from lgeo_jax.config import StudyConfig
from lgeo_jax.data import AlpacaRecord, SplitConfig, TokenizeConfig, load_alpaca
from lgeo_jax.manifest import Run


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


def adapter_names(config: StudyConfig) -> list[str]:
    return [f"r{r}" for r in config.lora.ranks]


def adapter_dirs(run: Run, config: StudyConfig) -> list[Path]:
    return [run.stage_dir("adapters") / name for name in adapter_names(config)]


def split_config(config: StudyConfig) -> SplitConfig:
    return SplitConfig(train=config.data.train, probe=config.data.probe, heldout=config.data.heldout)


def tokenize_config(config: StudyConfig) -> TokenizeConfig:
    return TokenizeConfig(max_length=config.data.max_length, loss_on=config.data.loss_on.value,
                          overflow=config.data.overflow.value)


# ---- SAEs (written by the `saes` stage) ------------------------------------------------------------
# saes/delta/r{R}_L{L}_s{seed}/   delta SAE for adapter rank R at layer L (lgeo_jax.sae.save_sae format)
# saes/base/L{L}_s{seed}/         SAE on h_base at layer L (base-base baseline; the dictionary for builtin runs)
# saes/gemma_scope/layer_{L}/width_{W}/average_l0_{N}/params.npz
#                                 the base SAEs (seed 0) exported in the Gemma Scope layout, used as the
#                                 "Gemma Scope" dictionary when the config gives no gemma_scope_dir
# saes/sweep.json                 the L1 sweep (Table 12): [{"l1", "l0", "rel_l2", "fvu", ...}, ...]
def delta_sae_dir(run: Run, rank: int, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "delta" / f"r{rank}_L{layer}_s{seed}"


def base_sae_dir(run: Run, layer: int, seed: int) -> Path:
    return run.stage_dir("saes") / "base" / f"L{layer}_s{seed}"


def gemma_scope_root(run: Run, config: StudyConfig) -> Path:
    """The Gemma Scope-layout directory the analysis compares against."""
    if config.analysis.gemma_scope_dir:
        return Path(config.analysis.gemma_scope_dir)
    return run.stage_dir("saes") / "gemma_scope"


def sweep_path(run: Run) -> Path:
    return run.stage_dir("saes") / "sweep.json"
