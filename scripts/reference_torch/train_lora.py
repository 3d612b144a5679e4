"""LoRA fine-tuning with transformers + PEFT and a plain torch loop, one rank after another.

This is how a torch user runs the paper's rank sweep: for each rank a fresh base model, `get_peft_model`,
AdamW (fused CPU/GPU kernel) on the LoRA factors only, transformers' warmup + decay schedule, global
gradient-norm clipping, gradient accumulation with the loss divided by the number of micro-batches, and a
response-only loss through ``labels = -100`` on every token that is not a target. Each rank trains on its
own, so four ranks cost four full training runs (the stacked JAX trainer's point of comparison).

Loss convention (the same as lgeo_jax.train): ``loss_mask[t] == 1`` makes token t a target, predicted from
position t - 1; transformers' causal-LM loss shifts the labels itself and averages over the batch's
target tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence

import numpy as np
import peft
import torch
import transformers

from ._threads import set_threads


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Optimisation and adapter settings shared by every rank (defaults: configs/paper.yaml, no dropout)."""

    lr: float = 2e-4
    alpha_over_rank: float = 2.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    schedule: str = "linear"  # transformers.get_scheduler name: constant_with_warmup, linear, cosine, ...
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: torch.dtype = torch.float32  # base weights and LoRA factors
    autocast_bf16: bool = False  # bf16 compute with the factors kept in `dtype`
    seed: int = 0
    device: str = "cpu"


@dataclasses.dataclass
class LoraRun:
    """One rank's training: the trained PEFT model, per-step losses and per-step wall times."""

    rank: int
    model: peft.PeftModel
    losses: np.ndarray  # [steps] mean target-token loss, averaged over the step's micro-batches
    step_seconds: np.ndarray  # [steps] wall time of each optimizer step


def make_batches(
    input_ids: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray | None = None
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches [N, B, T] of ids and masks -> model kwargs with ``labels`` (-100 off target)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)  # [N, B, T]
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    mask = mask.long()
    target = torch.as_tensor(np.asarray(loss_mask)).bool() & mask.bool()  # [N, B, T]
    labels = torch.where(target, ids, torch.full_like(ids, -100))  # [N, B, T]
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(ids.shape[0])]


def make_peft_model(base_dir: str | os.PathLike, rank: int, settings: LoraSettings,
                    init_dir: str | os.PathLike | None = None) -> peft.PeftModel:
    """A fresh base model (eager attention) with one trainable LoRA adapter of ``rank`` (PEFT's init: B = 0).

    With ``init_dir`` the adapter starts from that PEFT directory instead (its own r, alpha and targets), so
    a benchmark can start this loop and another trainer from identical factors.
    """
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager",
                                                             dtype=settings.dtype)
    if init_dir is not None:
        return peft.PeftModel.from_pretrained(base, init_dir, is_trainable=True).to(settings.device)
    torch.manual_seed(settings.seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=settings.alpha_over_rank * rank, lora_dropout=settings.dropout,
                          target_modules=list(settings.targets), task_type="CAUSAL_LM")
    return peft.get_peft_model(base, cfg).to(settings.device)


def _optimizer(params: list[torch.nn.Parameter], settings: LoraSettings, steps: int):
    # torch's AdamW defaults to weight_decay=0.01; pass the configured value explicitly.
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=settings.weight_decay, fused=True)
    sched = transformers.get_scheduler(settings.schedule, opt, num_warmup_steps=settings.warmup_steps,
                                       num_training_steps=steps)
    return opt, sched


def train_rank(
    model: peft.PeftModel, batches: Sequence[dict[str, torch.Tensor]], steps: int, settings: LoraSettings
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` optimizer steps on ``batches`` (cycled, ``grad_accum`` per step): (losses [steps], seconds [steps])."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, settings, steps)
    device = torch.device(settings.device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]  # once, not every step
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if settings.autocast_bf16
                else contextlib.nullcontext())
    losses, seconds = np.zeros(steps), np.zeros(steps)
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for j in range(settings.grad_accum):
            batch = batches[(step * settings.grad_accum + j) % len(batches)]
            with autocast:
                loss = model(**batch, use_cache=False).loss
            (loss / settings.grad_accum).backward()
            total += loss.detach().float()
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = total.item() / settings.grad_accum  # .item() waits for the device
        seconds[step] = time.perf_counter() - t0
    return losses, seconds


def train_ranks(
    base_dir: str | os.PathLike,
    ranks: Sequence[int],
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    steps: int,
    *,
    attention_mask: np.ndarray | None = None,
    settings: LoraSettings = LoraSettings(),
    init_dirs: Sequence[str | os.PathLike] | None = None,
    threads: int | None = None,
) -> list[LoraRun]:
    """Trains one PEFT model per rank, one after another, on the same micro-batches [N, B, T].

    ``init_dirs``: one PEFT directory per rank to start from (see `make_peft_model`); default PEFT's init.
    """
    set_threads(threads)
    batches = make_batches(input_ids, loss_mask, attention_mask)
    inits = [None] * len(ranks) if init_dirs is None else list(init_dirs)
    if len(inits) != len(ranks):
        raise ValueError(f"train_ranks: {len(inits)} init_dirs for {len(ranks)} ranks")
    runs = []
    for rank, init_dir in zip(ranks, inits, strict=True):
        model = make_peft_model(base_dir, rank, settings, init_dir)
        losses, seconds = train_rank(model, batches, steps, settings)
        runs.append(LoraRun(rank, model, losses, seconds))
    return runs


def time_lora_steps(
    base_dir: str | os.PathLike,
    ranks: Sequence[int],
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    steps: int,
    *,
    warmup: int = 1,
    attention_mask: np.ndarray | None = None,
    settings: LoraSettings = LoraSettings(),
    threads: int | None = None,
) -> dict[int, float]:
    """Mean seconds per optimizer step for each rank over ``steps`` steps after ``warmup`` untimed ones
    (model loading excluded)."""
    runs = train_ranks(base_dir, ranks, input_ids, loss_mask, warmup + steps, attention_mask=attention_mask,
                       settings=settings, threads=threads)
    return {run.rank: float(run.step_seconds[warmup:].mean()) for run in runs}
