"""Training: LoRA fine-tuning of adapter stacks, pretraining of the built-in tiny base, held-out evaluation."""

from lgeo_jax.train._checkpoint import TrainCheckpoints
from lgeo_jax.train._config import TrainConfig
from lgeo_jax.train._curves import plot_losses, write_loss_csv
from lgeo_jax.train._evaluate import HeldoutEval, evaluate_heldout
from lgeo_jax.train._lora_trainer import (
    NonFiniteLossError,
    TrainResult,
    loss_and_grads,
    total_steps,
    train_lora,
)
from lgeo_jax.train._loss import next_token_loss, token_losses
from lgeo_jax.train._optim import clip_per_adapter, init_on_mesh, lora_optimizer
from lgeo_jax.train._pretrain import PretrainResult, pretrain_base
from lgeo_jax.train._sequential import split_adapters, train_sequential

__all__ = [
    "HeldoutEval", "NonFiniteLossError", "PretrainResult", "TrainCheckpoints", "TrainConfig", "TrainResult",
    "clip_per_adapter", "evaluate_heldout", "init_on_mesh", "loss_and_grads", "lora_optimizer", "next_token_loss",
    "plot_losses", "pretrain_base", "split_adapters", "token_losses", "total_steps", "train_lora", "train_sequential",
    "write_loss_csv",
]
