"""One SAE's shape and architecture (`SAEConfig`), and the `sae` section: how the study trains its SAEs
(`SAETrainConfig`, every field a YAML key under `sae:`)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator

from lgeo_jax.config import (
    Problem,
    Section,
    at_least,
    cross_check,
    default_of,
    each,
    field,
    greater,
    in_range,
    nonempty_distinct,
    section,
)
from lgeo_jax.optim import Schedule


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


class Normalize(enum.StrEnum):
    """`rms`: the SAE sees x / s with s = sqrt(mean_t ||x_t||^2 / d) fitted on its data and saved with it (the
    paper's "post-norm"); `none`: the SAE sees raw x (saved scale 1, the paper's "pre-norm" arm of Table 12)."""

    RMS = "rms"
    NONE = "none"


class _ArchitectureChecks:
    """The rules on `architecture` and `k` shared by `SAEConfig` and `SAETrainConfig`."""

    @cross_check("architecture", "k")
    def _topk(self) -> Iterator[Problem]:
        if self.architecture is Arch.TOPK and self.k is None:
            yield Problem("k", "required when architecture is 'topk' (active latents per token)")
        if self.architecture is not Arch.TOPK and self.k is not None:
            yield Problem("k", f"only used with architecture 'topk', not '{self.architecture.value}'; remove it")


@dataclasses.dataclass(frozen=True)  # positional (d_in, d_sae, architecture): SAEs are built in code all the time
class SAEConfig(_ArchitectureChecks, Section):
    """Shape and architecture of one SAE: what is saved with it and read from other libraries' formats."""

    d_in: int = field(check=greater(0))
    d_sae: int = field(check=greater(0))
    architecture: Arch = field(Arch.RELU)
    k: int | None = field(None, check=greater(0))  # active latents per token, TopK only

    @cross_check("d_sae", "k")
    def _k_fits(self) -> Iterator[Problem]:
        if self.k is not None and self.k > self.d_sae:
            yield Problem("k", f"{self.k} exceeds d_sae={self.d_sae}")


def _default_l1(s: SAETrainConfig) -> float | None:
    return 0.15 if s.architecture is Arch.RELU else None  # the paper's post-norm coefficient; TopK has no L1


@section
class SAETrainConfig(_ArchitectureChecks, Section):
    """The `sae` section: SAEs on delta activations (and, with `base_saes`, on h_base for the base-base
    baseline), all trained in one job. Every SAE of the job shares these settings; each gets its own L1
    coefficient (a sweep point, or `l1`) and seed.

    Loss (in SAE units, see `lgeo_jax.sae._step`): squared error summed over d, averaged over tokens, plus
    ``l1 * mean_tokens sum_i f_i`` for ReLU. Length: exactly one of `epochs` (passes over the training
    split), `token_budget` (tokens per SAE) or `steps`. Learning rate: linear warmup over
    `lr_warmup_steps`, then `lr_schedule` (constant, or linear / cosine decay to 0 over the last
    `lr_decay_fraction` of the steps). The L1 coefficient ramps linearly from 0 over `l1_warmup_steps`.
    """

    architecture: Arch = default_of(SAEConfig, "architecture", Arch.RELU)
    k: int | None = default_of(SAEConfig, "k", None)
    width: int | None = field(16_384, check=greater(0))
    expansion_factor: float | None = field(None, check=greater(0))
    l1: float | None = field(check=greater(0), derived=_default_l1)  # ReLU; None: pick from l1_sweep by l0_target
    l1_sweep: tuple[float, ...] = field((), check=each(greater(0)))
    l0_target: tuple[float, float] = field((20.0, 50.0), check=each(greater(0)))  # the paper's 20-50 active
    l1_warmup_steps: int = field(0, check=at_least(0))
    sparsity: Sparsity = field(Sparsity.UNIT_DECODER)
    normalize: Normalize = field(Normalize.RMS)
    lr: float = field(1e-4, check=greater(0))
    lr_warmup_steps: int = field(0, check=at_least(0))
    lr_schedule: Schedule = field(Schedule.CONSTANT)
    lr_decay_fraction: float = field(0.2, check=in_range(0.0, 1.0))
    adam_b1: float = field(0.9, check=in_range(0.0, 1.0, hi_open=True))
    adam_b2: float = field(0.999, check=in_range(0.0, 1.0, hi_open=True))
    batch_size: int = field(512, check=greater(0))
    epochs: int | None = field(check=greater(0), derived=lambda s: 10 if s.token_budget is None and s.steps is None
                               else None)
    token_budget: int | None = field(None, check=greater(0))
    steps: int | None = field(None, check=greater(0))
    b_dec_init: BDecInit = field(BDecInit.GEOMETRIC_MEDIAN)
    scale_batches: int = field(16, check=greater(0))  # batches (from the stream's start) that fix scale and b_dec
    dead_window_tokens: int = field(1_000_000, check=greater(0))  # a latent silent this long counts as dead
    eval_rows: int = field(4096, check=at_least(0))  # held-out rows per SAE for its metrics; 0: none
    seeds: tuple[int, ...] = field((0,), check=nonempty_distinct(at_least(0)))
    base_saes: bool = field(True)
    train_split: str = field("probe")  # a split of extract.splits (the study checks it)
    log_every: int = field(50, check=greater(0), affects_results=False)
    eval_every: int = field(500, check=greater(0), affects_results=False)
    checkpoint_every: int = field(1000, check=greater(0), affects_results=False)
    keep_checkpoints: int = field(2, check=greater(0), affects_results=False)

    def resolved_width(self, d_in: int) -> int:
        return self.width if self.width is not None else int(round(self.expansion_factor * d_in))

    def sae_config(self, d_in: int) -> SAEConfig:
        """The shape every SAE of this job has on `d_in`-wide activations."""
        return SAEConfig(d_in, self.resolved_width(d_in), self.architecture, self.k)

    def total_steps(self, n_rows: int) -> int:
        """Optimizer steps for a source of ``n_rows`` training tokens per SAE."""
        if self.steps is not None:
            return self.steps
        tokens = self.token_budget if self.token_budget is not None else self.epochs * n_rows
        return max(1, -(-tokens // self.batch_size))

    def decay_steps(self, total: int) -> int:
        return int(round(self.lr_decay_fraction * total))

    @cross_check("width", "expansion_factor")
    def _width(self) -> Iterator[Problem]:
        if (self.width is None) == (self.expansion_factor is None):
            yield Problem(
                "width",
                "set exactly one of sae.width and sae.expansion_factor "
                f"(got {'both' if self.width is not None else 'neither'})",
            )

    @cross_check("epochs", "token_budget", "steps")
    def _duration(self) -> Iterator[Problem]:
        given = [n for n in ("epochs", "token_budget", "steps") if getattr(self, n) is not None]
        if len(given) != 1:
            yield Problem("epochs", f"set exactly one of sae.epochs, sae.token_budget and sae.steps (got "
                                    f"{', '.join(given) or 'none'}; set the others to null)")

    @cross_check("architecture", "l1", "l1_sweep")
    def _penalty(self) -> Iterator[Problem]:
        if self.architecture is Arch.JUMPRELU:
            yield Problem("architecture", "JumpReLU SAEs are loaded and run (Gemma Scope), not trained here; "
                                          "train 'relu' or 'topk'")
        elif self.architecture is Arch.RELU and self.l1 is None and not self.l1_sweep:
            yield Problem("l1", "null means 'pick from sae.l1_sweep by sae.l0_target', but sae.l1_sweep is empty")
        elif self.architecture is Arch.TOPK:
            for name in ("l1", "l1_sweep"):
                if getattr(self, name):
                    yield Problem(name, "not used by architecture 'topk' (k sets the sparsity); remove it")

    @cross_check("l0_target")
    def _l0_target(self) -> Iterator[Problem]:
        lo, hi = self.l0_target
        if lo > hi:
            yield Problem("l0_target", f"expected [low, high] with low <= high, got [{lo}, {hi}]")

    @cross_check("width", "k")
    def _k_fits(self) -> Iterator[Problem]:
        if self.width is not None and self.k is not None and self.k > self.width:
            yield Problem("k", f"{self.k} exceeds the SAE width {self.width}")
