"""One SAE's shape and architecture (`SAEConfig`), and the `sae` section: how the study trains its SAEs
(`SAETrainConfig`, every field a YAML key under `sae:`)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator

from lgeo_jax.config import (
    DType,
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

    - ``RELU``: ``f = relu((x - b_dec) W_enc + b_enc)`` (SAELens "standard", the paper's delta SAE); trained
      with an L1 penalty.
    - ``JUMPRELU``: ``pre = x W_enc + b_enc``; ``f = (pre > threshold) * relu(pre)`` (Gemma Scope; b_dec
      is NOT subtracted); trained with an L0 penalty through a straight-through threshold gradient.
    - ``TOPK``: ``f = relu(topk_k((x - b_dec) W_enc + b_enc))`` (SAELens "topk", sparsify); trained with AuxK.
    - ``BATCHTOPK``: trained with the ``k * batch`` largest activations of the whole batch kept (SAELens
      "batchtopk", AuxK as TopK); runs as ``f = (pre > threshold) * relu(pre)`` on
      ``pre = (x - b_dec) W_enc + b_enc`` with the threshold learnt during training (what SAELens saves).
    All decode with ``x_hat = f W_dec + b_dec``.
    """

    RELU = "relu"
    JUMPRELU = "jumprelu"
    TOPK = "topk"
    BATCHTOPK = "batchtopk"

    @property
    def subtracts_b_dec(self) -> bool:
        """Whether the encoder sees ``x - b_dec`` (all but Gemma Scope's JumpReLU form)."""
        return self is not Arch.JUMPRELU

    @property
    def has_threshold(self) -> bool:
        return self in (Arch.JUMPRELU, Arch.BATCHTOPK)

    @property
    def uses_k(self) -> bool:
        return self in (Arch.TOPK, Arch.BATCHTOPK)


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
        arch = self.architecture
        if arch.uses_k and self.k is None:
            yield Problem("k", f"required when architecture is '{arch.value}' (active latents per token)")
        if not arch.uses_k and self.k is not None:
            yield Problem("k", f"only used with architecture 'topk' or 'batchtopk', not '{arch.value}'; remove it")


@dataclasses.dataclass(frozen=True)  # positional (d_in, d_sae, architecture): SAEs are built in code all the time
class SAEConfig(_ArchitectureChecks, Section):
    """Shape and architecture of one SAE: what is saved with it and read from other libraries' formats."""

    d_in: int = field(check=greater(0))
    d_sae: int = field(check=greater(0))
    architecture: Arch = field(Arch.RELU)
    k: int | None = field(None, check=greater(0))  # active latents per token (TopK) or per token on average

    @cross_check("d_sae", "k")
    def _k_fits(self) -> Iterator[Problem]:
        if self.k is not None and self.k > self.d_sae:
            yield Problem("k", f"{self.k} exceeds d_sae={self.d_sae}")


class _ForArch:
    """A derived default that exists for some architectures only: `value` for them, None for the others.
    `SAETrainConfig` refuses such a field set for an architecture that does not use it (one rule, read
    from the fields themselves, so no second table of which setting belongs to which architecture)."""

    def __init__(self, value, *archs: Arch, why: str | Callable[[Arch], str]):
        self.value, self.archs, self.why = value, archs, why

    def reason(self, arch: Arch) -> str:
        return self.why(arch) if callable(self.why) else self.why

    def __call__(self, s: SAETrainConfig):
        return self.value if s.architecture in self.archs else None


def _fraction(value: float) -> Iterator[tuple[str, str]]:
    if not 0 < value <= 1:
        yield "", f"expected a fraction in (0, 1], got {value:g}"


def _for_arch(value, *archs: Arch, why: str | Callable[[Arch], str], check=None):
    return field(check=check, derived=_ForArch(value, *archs, why=why))


@section
class SAETrainConfig(_ArchitectureChecks, Section):
    """The `sae` section: SAEs on delta activations (and, with `base_saes`, on h_base for the base-base
    baseline), all trained in one job. Every SAE of the job shares these settings; each gets its own L1
    coefficient (a sweep point, or `l1`) and seed, and each seed its own data order.

    Loss (in SAE units, see `lgeo_jax.sae._losses`): squared error summed over d, averaged over tokens, plus
    the architecture's sparsity term: ReLU ``l1 * mean_tokens sum_i f_i`` (ramped in over
    `l1_warmup_steps`); TopK / BatchTopK none (k sets the sparsity) but the AuxK loss (``auxk_coeff``) that
    gives dead latents the live latents' residual; JumpReLU ``l0_coeff * mean_tokens L0`` through a
    straight-through threshold gradient (bandwidth `jumprelu_bandwidth`). Decoder rows are unit-norm
    (gradient component along each row removed, then rows renormalised after each step) unless a ReLU SAE
    uses `sparsity: decoder_norm`. Length: exactly one of `epochs` (passes over the training split),
    `token_budget` (tokens per SAE) or `steps`. Learning rate: linear warmup over `lr_warmup_steps`, then
    `lr_schedule` (constant, or linear / cosine decay to 0 over the last `lr_decay_fraction` of the steps).

    `l1: null` picks the coefficient from `l1_sweep` whose held-out L0 lies in `l0_target`; when none does,
    up to `l1_sweep_rounds` more rounds search (inside the bracketing pair of coefficients, or beyond the grid
    on the side the target lies), and if still none lands inside, the stage fails naming the L0s found and
    the grid to try next (`allow_off_target: true` takes the nearest instead, with a warning).
    """

    architecture: Arch = default_of(SAEConfig, "architecture", Arch.RELU)
    k: int | None = default_of(SAEConfig, "k", None)
    width: int | None = field(16_384, check=greater(0))
    expansion_factor: float | None = field(None, check=greater(0))
    # the paper's post-norm coefficient; None: pick from l1_sweep by l0_target
    l1: float | None = _for_arch(0.15, Arch.RELU, why=lambda a: "k sets the sparsity" if a.uses_k else
                                 "its sparsity term is l0_coeff", check=greater(0))
    l1_sweep: tuple[float, ...] = field((), check=each(greater(0)))
    l1_sweep_rounds: int = field(2, check=at_least(0))  # more rounds when l1 is null and no point is on target
    l0_target: tuple[float, float] = field((20.0, 50.0), check=each(greater(0)))  # the paper's 20-50 active
    allow_off_target: bool = field(False)  # l1: null and no sweep point on target: warn, take the nearest
    l1_warmup_steps: int = field(0, check=at_least(0))
    sparsity: Sparsity = field(Sparsity.UNIT_DECODER)
    auxk_coeff: float | None = _for_arch(1.0, Arch.TOPK, Arch.BATCHTOPK, why="AuxK is the TopK family's dead-"
                                         "latent loss", check=at_least(0))  # SAELens' aux_loss_coefficient
    batchtopk_threshold_lr: float | None = _for_arch(0.01, Arch.BATCHTOPK, why="only BatchTopK learns a "
                                                     "global threshold", check=in_range(0.0, 1.0))
    l0_coeff: float | None = _for_arch(1.0, Arch.JUMPRELU, why="only JumpReLU trains an L0 penalty",
                                       check=greater(0))  # SAELens' l0_coefficient ("step" mode)
    jumprelu_bandwidth: float | None = _for_arch(0.05, Arch.JUMPRELU, why="it is the JumpReLU threshold's "
                                                 "straight-through kernel width", check=greater(0))
    # SAELens' 0.01 is for its 0.1-norm initial decoder rows; ours are unit-norm, so pre-activations start ~10x
    # larger (about N(0, 1) in SAE units) and so does the threshold
    jumprelu_init_threshold: float | None = _for_arch(0.1, Arch.JUMPRELU, why="only JumpReLU has a trained "
                                                      "per-latent threshold", check=at_least(0))
    resample_dead: bool = field(False)  # ReLU: re-initialise dead latents every dead window, first half of the run
    normalize: Normalize = field(Normalize.RMS)
    lr: float = field(1e-4, check=greater(0))
    lr_warmup_steps: int = field(0, check=at_least(0))
    lr_schedule: Schedule = field(Schedule.CONSTANT)
    lr_decay_fraction: float = field(0.2, check=in_range(0.0, 1.0))
    adam_b1: float = field(0.9, check=in_range(0.0, 1.0, hi_open=True))
    adam_b2: float = field(0.999, check=in_range(0.0, 1.0, hi_open=True))
    batch_size: int = field(512, check=greater(0))
    # bfloat16: the training matmuls (encoder, decoder and their gradients) multiply operands rounded to bf16 with
    # float32 accumulation; weights, gradients, Adam and everything else stay float32 (bench/sae.md: its effect)
    matmul_dtype: DType = field(DType.FLOAT32)
    epochs: int | None = field(check=greater(0), derived=lambda s: 10 if s.token_budget is None and s.steps is None
                               else None)
    token_budget: int | None = field(None, check=greater(0))
    steps: int | None = field(None, check=greater(0))
    b_dec_init: BDecInit = field(BDecInit.GEOMETRIC_MEDIAN)
    scale_batches: int = field(16, check=greater(0))  # batches (from the stream's start) that fix scale and b_dec
    # a latent silent for this fraction of the run's steps counts as dead (health, AuxK, resampling)
    dead_window_fraction: float = field(0.1, check=_fraction)
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

    def dead_window_steps(self, total: int) -> int:
        """Steps a latent must stay silent to count as dead: `dead_window_fraction` of a `total`-step run."""
        return max(1, int(round(self.dead_window_fraction * total)))

    @property
    def low_precision(self) -> str | None:
        """The dtype the training matmuls round their operands to (`matmul_dtype`), None for float32."""
        return None if self.matmul_dtype is DType.FLOAT32 else self.matmul_dtype.value

    @property
    def unit_decoder(self) -> bool:
        """Decoder rows held at unit norm (every architecture but a ReLU SAE with `sparsity: decoder_norm`)."""
        return self.sparsity is Sparsity.UNIT_DECODER

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

    @cross_check("architecture", "l1", "l1_sweep", "auxk_coeff", "batchtopk_threshold_lr", "l0_coeff",
                 "jumprelu_bandwidth", "jumprelu_init_threshold", "resample_dead", "sparsity")
    def _per_architecture(self) -> Iterator[Problem]:
        arch = self.architecture
        for f in dataclasses.fields(self):
            rule = f.metadata.get("derived")
            if isinstance(rule, _ForArch) and arch not in rule.archs and getattr(self, f.name) is not None:
                yield Problem(f.name, f"not used by architecture '{arch.value}' ({rule.reason(arch)}); remove it")
        if arch is Arch.RELU and self.l1 is None and not self.l1_sweep:
            yield Problem("l1", "null means 'pick from sae.l1_sweep by sae.l0_target', but sae.l1_sweep is empty")
        if arch is not Arch.RELU and self.l1_sweep:
            yield Problem("l1_sweep", f"not used by architecture '{arch.value}' (only ReLU has an L1 penalty); "
                                      "remove it")
        if arch is not Arch.RELU and self.resample_dead:
            yield Problem("resample_dead", f"only for architecture 'relu' ('{arch.value}' has its own dead-latent "
                                           "remedy); remove it")
        if arch is not Arch.RELU and self.sparsity is Sparsity.DECODER_NORM:
            yield Problem("sparsity", f"decoder_norm weights the ReLU L1 penalty; '{arch.value}' SAEs keep unit "
                                      "decoder rows")

    @cross_check("l0_target")
    def _l0_target(self) -> Iterator[Problem]:
        lo, hi = self.l0_target
        if lo > hi:
            yield Problem("l0_target", f"expected [low, high] with low <= high, got [{lo}, {hi}]")

    @cross_check("width", "k")
    def _k_fits(self) -> Iterator[Problem]:
        if self.width is not None and self.k is not None and self.k > self.width:
            yield Problem("k", f"{self.k} exceeds the SAE width {self.width}")
