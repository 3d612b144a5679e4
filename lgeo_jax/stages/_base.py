"""The `base` stage: pretrain and save the built-in tiny model, or validate the user's checkpoint.

Output: `base/model/` (builtin only, an HF Gemma-2 directory), `base/pretrain_loss.csv`, and the
checkpoint path plus its shape in the manifest's progress, for the stages downstream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lgeo_jax.config import StudyConfig
from lgeo_jax.data import tokenize_split
from lgeo_jax.manifest import Run, StageRun, atomic_directory
from lgeo_jax.model import Gemma2Config, check_checkpoint, count_params, save_model
from lgeo_jax.stages._inputs import (
    base_checkpoint,
    builtin_model_config,
    load_records,
    load_tokenizer,
    split_config,
    tokenize_config,
)
from lgeo_jax.train._curves import write_loss_csv
from lgeo_jax.train._pretrain import pretrain_base


def check_study_checkpoint(path: Path, config: StudyConfig) -> Gemma2Config:
    """What `load_model` checks before reading a byte (config.json, every header and tensor shape), plus
    the shape the study config declares (model.n_layers / model.d_model), without loading the weights."""
    cfg = check_checkpoint(path)
    for name, have in (("n_layers", cfg.n_layers), ("d_model", cfg.d_model)):
        want = getattr(config.model, name)
        if want is not None and want != have:
            raise ValueError(f"model.{name} is {want} but the checkpoint {path} has {name}={have}; fix model.{name} "
                             "or point model.checkpoint at the intended model")
    return cfg


def run_base(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Builtin: pretrain on the training split (whole-sequence loss) and save; else validate and record.

    The caller owns the stage's lifecycle (`run.begin` before, `stage.finish()` after this returns).
    """
    path = base_checkpoint(run, config)
    if not config.model.is_builtin:
        cfg = check_study_checkpoint(path, config)
        stage.update(checkpoint=str(path.resolve()), n_layers=cfg.n_layers, d_model=cfg.d_model,
                     vocab_size=cfg.vocab_size)
        return
    if stage.is_done("model"):
        return
    builtin = config.model.builtin
    tokenizer = load_tokenizer(run, config)
    tok_cfg = dataclasses.replace(tokenize_config(config), loss_on="all")
    examples = tokenize_split(load_records(run), tokenizer, split_config(config), "train", tok_cfg)
    cfg = builtin_model_config(config, len(tokenizer))
    # Pretraining restarts from scratch after a crash (it is short); the manifest says it is under way.
    stage.update(pretraining=f"{builtin.pretrain_steps} steps on {len(examples)} training sequences")
    result = pretrain_base(cfg, examples, steps=builtin.pretrain_steps, lr=builtin.pretrain_lr,
                           batch_size=builtin.pretrain_batch_size, seed=builtin.seed)
    dtype = config.model.dtype.value if config.model.dtype is not None else None
    with atomic_directory(path, overwrite=True) as tmp:
        save_model(result.model, tmp, dtype=dtype)
    write_loss_csv(stage.path / "pretrain_loss.csv", ["loss"], result.losses[:, None])
    losses = result.losses
    stage.update(checkpoint=str(path.resolve()), n_layers=cfg.n_layers, d_model=cfg.d_model,
                 vocab_size=cfg.vocab_size, n_params=count_params(result.model), pretrain_steps=int(losses.size),
                 pretrain_loss_first=float(losses[0]) if losses.size else None,
                 pretrain_loss_last=float(losses[-1]) if losses.size else None,
                 pretrain_seconds=round(result.seconds, 2))
    stage.mark_done("model")
