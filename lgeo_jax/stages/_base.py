"""The `base` stage: pretrain and save the built-in tiny model, or validate the user's checkpoint.

Output: `base/model/` (builtin only, an HF Gemma-2 directory), `base/pretrain_loss.csv`, and the
checkpoint path plus its shape in the manifest's progress, for the stages downstream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lgeo_jax.data import LossOn, tokenize_split
from lgeo_jax.files import atomic_directory
from lgeo_jax.model import Gemma2Config, check_checkpoint, count_params, save_model
from lgeo_jax.stages._layout import base_checkpoint, load_records, load_tokenizer
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig
from lgeo_jax.train import pretrain_base, write_loss_csv


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
    tokenizer = load_tokenizer(run, config)
    data = dataclasses.replace(config.data, loss_on=LossOn.ALL)  # pretraining predicts every token
    examples = tokenize_split(load_records(run), tokenizer, data, "train")
    cfg = config.model.builtin.with_vocab(len(tokenizer))
    # Pretraining restarts from scratch after a crash (it is short); the manifest says it is under way.
    stage.update(pretraining=f"{cfg.pretrain_steps} steps on {len(examples)} training sequences")
    result = pretrain_base(cfg, examples)
    with atomic_directory(path, overwrite=True) as tmp:
        save_model(result.model, tmp, dtype=config.model.param_dtype)
    write_loss_csv(stage.path / "pretrain_loss.csv", ["loss"], result.losses[:, None])
    losses = result.losses
    stage.update(checkpoint=str(path.resolve()), n_layers=cfg.n_layers, d_model=cfg.d_model,
                 vocab_size=cfg.vocab_size, n_params=count_params(result.model), pretrain_steps=int(losses.size),
                 pretrain_loss_first=float(losses[0]) if losses.size else None,
                 pretrain_loss_last=float(losses[-1]) if losses.size else None,
                 pretrain_seconds=round(result.seconds, 2))
    stage.mark_done("model")
