"""Frozen configs for one SAE's shape/architecture and for a training job over many SAEs."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json


class Arch(enum.StrEnum):
    """SAE architectures. The encoder forms differ in whether b_dec is subtracted from the input first.

    - ``RELU``: ``f = relu((x - b_dec) W_enc + b_enc)`` (SAELens "standard", the paper's delta SAE).
    - ``JUMPRELU``: ``pre = x W_enc + b_enc``; ``f = (pre > threshold) * relu(pre)`` (Gemma Scope; b_dec
      is NOT subtracted). Loaded and run; not trained here.
    - ``TOPK``: ``f = relu(topk_k((x - b_dec) W_enc + b_enc))`` (SAELens "topk", sparsify).
    All decode with ``x_hat = f W_dec + b_dec``.
    """

    RELU = "relu"
    JUMPRELU = "jumprelu"
    TOPK = "topk"


class Sparsity(enum.StrEnum):
    """How the ReLU SAE's L1 penalty is made scale-invariant.

    - ``UNIT_DECODER`` (default, the paper's "L1 on activations"): penalty ``sum_i f_i``, decoder rows
      renormalised to unit norm after every optimizer step, so the penalty cannot be dodged by shrinking
      ``f`` and growing ``W_dec``. Unit rows are also what the geometry analysis compares.
    - ``DECODER_NORM`` (SAELens/Anthropic 2024 variant): penalty ``sum_i f_i ||W_dec_i||`` with an
      unconstrained decoder: a pure loss term, no projection after the step.
    """

    UNIT_DECODER = "unit_decoder"
    DECODER_NORM = "decoder_norm"


class BDecInit(enum.StrEnum):
    """Initial decoder bias: geometric median (robust to the huge-norm outlier tokens), mean, or zeros."""

    GEOMETRIC_MEDIAN = "geometric_median"
    MEAN = "mean"
    ZEROS = "zeros"


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Shape and architecture of one SAE (every SAE of a job shares it)."""

    d_in: int
    d_sae: int
    arch: Arch = Arch.RELU
    k: int = 0  # active latents per token, TopK only
    sparsity: Sparsity = Sparsity.UNIT_DECODER

    def __post_init__(self):
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "sparsity", Sparsity(self.sparsity))
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"SAEConfig: d_in={self.d_in} and d_sae={self.d_sae} must be positive")
        if self.arch is Arch.TOPK and not 0 < self.k <= self.d_sae:
            raise ValueError(f"SAEConfig: TopK needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        if self.arch is not Arch.TOPK and self.k:
            raise ValueError(f"SAEConfig: k={self.k} is only meaningful for arch='topk', not {self.arch.value!r}")

    def to_dict(self) -> dict:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "arch": self.arch.value, "k": self.k,
                "sparsity": self.sparsity.value}

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation policy shared by every SAE of a job (per-SAE L1 and seed are passed alongside).

    Length: ``steps`` if > 0, else ``token_budget`` tokens per SAE if > 0, else ``epochs`` passes over
    the source. LR: linear warmup over ``lr_warmup_steps``, constant, then linear decay to 0 over the
    last ``lr_decay_fraction`` of steps. L1 coefficient: linear ramp from 0 over ``l1_warmup_steps``.
    """

    batch_size: int = 512
    lr: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    steps: int = 0
    token_budget: int = 0
    epochs: int = 10
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.2
    l1_warmup_steps: int = 0
    b_dec_init: BDecInit = BDecInit.GEOMETRIC_MEDIAN
    scale_batches: int = 16  # batches (from the start of the stream) used to estimate RMS scale and b_dec
    dead_window_tokens: int = 1_000_000  # a latent silent for this many tokens counts as dead
    eval_rows: int = 4096  # held-out rows per SAE for reconstruction metrics; 0 disables held-out eval
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2

    def __post_init__(self):
        object.__setattr__(self, "b_dec_init", BDecInit(self.b_dec_init))
        for name in ("batch_size", "scale_batches", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "dead_window_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ValueError(f"TrainConfig.lr_decay_fraction must lie in [0, 1], got {self.lr_decay_fraction}")
        if self.eval_rows < 0:
            raise ValueError(f"TrainConfig.eval_rows must be >= 0, got {self.eval_rows}")
        if self.steps <= 0 and self.token_budget <= 0 and self.epochs <= 0:
            raise ValueError("TrainConfig: set one of steps, token_budget or epochs to a positive value")

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps for a source of ``n_rows`` training tokens per SAE."""
        if self.steps > 0:
            return self.steps
        tokens = self.token_budget if self.token_budget > 0 else self.epochs * n_rows
        return max(1, -(-tokens // self.batch_size))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["b_dec_init"] = self.b_dec_init.value
        return d


def config_hash(payload: dict) -> str:
    """Stable short hash of a JSON-able dict (sorted keys): stored in checkpoints to refuse mismatched resumes."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
