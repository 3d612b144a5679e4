"""The study's configuration: one frozen dataclass per section, defaults from the paper (PAPER.md).

Each section is what one pipeline stage depends on, so a stage can hash exactly its sections
(`section_hash`) and a change elsewhere never invalidates it. Values are checked on construction
(see `_convert.Section`); cross-section checks (layers against the model's depth, splits the
analysis needs) live on :class:`StudyConfig`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
from collections.abc import Iterator, Mapping

from lgeo_jax.config._convert import (
    REQUIRED,
    Section,
    at_least,
    cross_check,
    each,
    field,
    greater,
    in_range,
    layer_l0,
    nonempty_distinct,
    one_of,
    split_range,
)
from lgeo_jax.config._errors import Problem
from lgeo_jax.data._tokenize import LossOn, Overflow  # one definition, shared with the data pipeline

BUILTIN_MODEL = "builtin:tiny"
BUILTIN_DATA = "builtin:synthetic"
ALPACA_HUB_ID = "tatsu-lab/alpaca"
PLACEHOLDER_PREFIX = "FILL_IN"
SPLIT_NAMES = ("train", "probe", "heldout")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMMA_SCOPE_9B_L0 = types.MappingProxyType({5: 77, 10: 113, 18: 71, 22: 123, 32: 111, 38: 128})
"""Canonical Gemma Scope 9B `width_16k/average_l0_N` folders for the paper's layers (DESIGN.md section 5)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_URL = re.compile(r"^([a-z][a-z0-9+]*)://")
KVSTORE_SCHEMES = ("file", "gs", "s3", "memory")
SECTION_NAMES = ("model", "data", "lora", "train", "extract", "sae", "analysis", "report")
"""StudyConfig's hashable sections, in pipeline order (run_dir is where, not what)."""


class DType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class Schedule(enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class SaeArchitecture(enum.Enum):
    RELU = "relu"
    TOPK = "topk"
    JUMPRELU = "jumprelu"


class SaeNormalize(enum.Enum):
    """`rms`: the SAE sees x / s with s fitted on its data (the paper's "post-norm"); `none`: raw x."""

    RMS = "rms"
    NONE = "none"


class PlotFormat(enum.Enum):
    PNG = "png"
    SVG = "svg"
    PDF = "pdf"


def is_placeholder(value: str | None) -> bool:
    """True for values the user must still fill in (`FILL_IN: ...` in the shipped configs)."""
    return isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX)


_frozen = dataclasses.dataclass(frozen=True)


# ---- model --------------------------------------------------------------------------------------


@_frozen
class BuiltinModelConfig(Section):
    """The embedded tiny Gemma-2-architecture model `lgeo` builds and pretrains itself (offline
    default); names mirror `lgeo_jax.model.Gemma2Config`, layers alternate local/global as Gemma-2."""

    vocab_size: int | None = field(None, check=greater(0))  # None: the tokenizer's vocabulary size
    d_model: int = field(64, check=greater(0))
    n_layers: int = field(6, check=greater(0))
    n_heads: int = field(4, check=greater(0))
    n_kv_heads: int = field(2, check=greater(0))
    head_dim: int = field(16, check=greater(0))
    mlp_dim: int = field(256, check=greater(0))
    sliding_window: int = field(64, check=greater(0))
    query_pre_attn_scalar: float | None = field(None, check=greater(0))  # None: head_dim
    attn_logit_softcap: float | None = field(50.0, check=greater(0))
    final_logit_softcap: float | None = field(30.0, check=greater(0))
    rms_eps: float = field(1e-6, check=greater(0))
    rope_base: float = field(10_000.0, check=greater(0))
    pretrain_steps: int = field(300, check=at_least(0))
    pretrain_lr: float = field(3e-3, check=greater(0))
    pretrain_batch_size: int = field(16, check=greater(0))
    seed: int = field(0, check=at_least(0))

    @cross_check("n_heads", "n_kv_heads")
    def _gqa(self) -> Iterator[Problem]:
        if self.n_heads % self.n_kv_heads:
            yield Problem("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")

    @cross_check("head_dim")
    def _rope(self) -> Iterator[Problem]:
        if self.head_dim % 2:
            yield Problem("head_dim", f"must be even for RoPE, got {self.head_dim}")

    def gemma2_kwargs(self, vocab_size: int) -> dict:
        """Keyword arguments for `Gemma2Config` except `layer_types` (Gemma-2 alternates local/global:
        even layers sliding); `vocab_size` is used when this block leaves it unset (the tokenizer's)."""
        names = (
            "d_model",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "sliding_window",
            "attn_logit_softcap",
            "final_logit_softcap",
            "rms_eps",
            "rope_base",
        )
        kwargs = {n: getattr(self, n) for n in names}
        kwargs["vocab_size"] = self.vocab_size or vocab_size
        kwargs["query_pre_attn_scalar"] = self.query_pre_attn_scalar or float(self.head_dim)
        return kwargs


@_frozen
class ModelConfig(Section):
    """The base model: a local Hugging Face Gemma-2 directory, or `builtin:tiny`.

    `n_layers` / `d_model` declare a checkpoint's shape so layer choices and sizes validate before
    the checkpoint is downloaded; `check_paths` compares them with its config.json.
    """

    checkpoint: str = field(REQUIRED)
    dtype: DType | None = field(None)  # parameters; None: the checkpoint's (bf16 for real Gemma-2)
    activation_dtype: DType | None = field(None)  # residual stream; float32 keeps small deltas exact
    n_layers: int | None = field(None, check=greater(0))
    d_model: int | None = field(None, check=greater(0))
    builtin: BuiltinModelConfig | None = field(None)

    def __post_init__(self):
        if self.checkpoint == BUILTIN_MODEL and self.builtin is None:
            object.__setattr__(self, "builtin", BuiltinModelConfig())
        super().__post_init__()

    @property
    def is_builtin(self) -> bool:
        return self.checkpoint == BUILTIN_MODEL

    @property
    def known_n_layers(self) -> int | None:
        return self.builtin.n_layers if self.builtin is not None else self.n_layers

    @property
    def known_d_model(self) -> int | None:
        return self.builtin.d_model if self.builtin is not None else self.d_model

    @cross_check("checkpoint", "n_layers", "d_model", "builtin")
    def _builtin_or_checkpoint(self) -> Iterator[Problem]:
        if not self.checkpoint:
            yield Problem("checkpoint", f"expected a checkpoint directory or '{BUILTIN_MODEL}', got ''")
        if self.is_builtin:
            for name in ("n_layers", "d_model"):
                if getattr(self, name) is not None:
                    yield Problem(name, f"set it under model.builtin for '{BUILTIN_MODEL}', not here")
        elif self.builtin is not None:
            yield Problem(
                "builtin", f"only used with checkpoint '{BUILTIN_MODEL}'; remove it or set checkpoint: {BUILTIN_MODEL}"
            )


# ---- data ---------------------------------------------------------------------------------------


@_frozen
class DataConfig(Section):
    """Where records come from and how they are split; ranges are half-open `[start, stop)`."""

    source: str = field(ALPACA_HUB_ID)  # hub id, a local .json/.jsonl path, or builtin:synthetic
    sha256: str | None = field(None)  # verify a local file
    n_records: int | None = field(None, check=greater(0))  # synthetic only; None: enough for the splits
    synthetic_seed: int = field(0, check=at_least(0))
    tokenizer: str | None = field(None)  # None: the checkpoint's (or the synthetic one built with the data)
    max_length: int = field(512, check=at_least(2))
    overflow: Overflow = field(Overflow.TRUNCATE)
    loss_on: LossOn = field(LossOn.RESPONSE)
    train: tuple[int, int] = field((0, 10_000), check=split_range())
    probe: tuple[int, int] = field((5_000, 7_000), check=split_range())
    heldout: tuple[int, int] = field((11_000, 11_200), check=split_range())

    @property
    def is_synthetic(self) -> bool:
        return self.source == BUILTIN_DATA

    @property
    def is_local_file(self) -> bool:
        return self.source.endswith((".json", ".jsonl"))

    @property
    def required_records(self) -> int:
        return max(getattr(self, name)[1] for name in SPLIT_NAMES)

    @property
    def synthetic_records(self) -> int:
        """How many synthetic records to generate."""
        return self.n_records if self.n_records is not None else self.required_records

    def split(self, name: str) -> tuple[int, int]:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split '{name}'; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    @cross_check("source")
    def _source(self) -> Iterator[Problem]:
        if not (self.is_synthetic or self.is_local_file or _HUB_ID.match(self.source)):
            yield Problem(
                "source",
                f"expected '{BUILTIN_DATA}', a hub dataset id like '{ALPACA_HUB_ID}', "
                f"or a local .json/.jsonl file, got {self.source!r}",
            )

    @cross_check("sha256")
    def _sha256(self) -> Iterator[Problem]:
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            yield Problem("sha256", f"expected 64 lowercase hex digits, got {self.sha256!r}")

    @cross_check("train", "heldout")
    def _heldout_unseen(self) -> Iterator[Problem]:
        if max(self.heldout[0], self.train[0]) < min(self.heldout[1], self.train[1]):
            yield Problem(
                "heldout",
                f"{list(self.heldout)} overlaps train {list(self.train)}; held-out examples must never be trained on",
            )

    @cross_check("source", "n_records", "train", "probe", "heldout")
    def _n_records(self) -> Iterator[Problem]:
        if self.n_records is not None and not self.is_synthetic:
            yield Problem("n_records", f"only used with source '{BUILTIN_DATA}'; remove it")
        elif self.n_records is not None and self.n_records < self.required_records:
            yield Problem(
                "n_records",
                f"{self.n_records} records cannot hold the splits (they need "
                f"{self.required_records}); raise n_records or shrink the splits",
            )


# ---- LoRA and its training ----------------------------------------------------------------------


@_frozen
class LoraConfig(Section):
    """Adapters trained together: one per rank, alpha = alpha_over_rank * r (paper: 2r) or explicit."""

    ranks: tuple[int, ...] = field((4, 8, 16, 32), check=nonempty_distinct(greater(0)))
    alpha_over_rank: float | None = field(2.0, check=greater(0))
    alphas: tuple[float, ...] | None = field(None, check=each(greater(0)))
    targets: tuple[str, ...] = field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), check=nonempty_distinct(one_of(LORA_TARGETS, "module"))
    )
    dropout: float = field(0.05, check=in_range(0.0, 1.0, hi_open=True))
    use_rslora: bool = field(False)

    @cross_check("ranks", "alpha_over_rank", "alphas")
    def _alphas(self) -> Iterator[Problem]:
        if (self.alpha_over_rank is None) == (self.alphas is None):
            yield Problem(
                "alphas",
                "set exactly one of lora.alpha_over_rank and lora.alphas "
                f"(got {'both' if self.alphas is not None else 'neither'})",
            )
        elif self.alphas is not None and len(self.alphas) != len(self.ranks):
            yield Problem("alphas", f"expected one alpha per rank ({len(self.ranks)}), got {len(self.alphas)}")

    def alpha(self, rank: int) -> float:
        if self.alphas is not None:
            return self.alphas[self.ranks.index(rank)]
        return self.alpha_over_rank * rank

    def scaling(self, rank: int) -> float:
        """PEFT's multiplier on B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha(rank) / (rank**0.5 if self.use_rslora else rank)


@_frozen
class TrainConfig(Section):
    """LoRA fine-tuning; the paper's learning rate is not legible, 2e-4 is the common PEFT choice."""

    lr: float = field(2e-4, check=greater(0))
    warmup_steps: int | None = field(None, check=at_least(0))
    warmup_fraction: float | None = field(0.03, check=in_range(0.0, 1.0, hi_open=True))
    schedule: Schedule = field(Schedule.LINEAR)
    weight_decay: float = field(0.0, check=at_least(0))
    max_grad_norm: float | None = field(1.0, check=greater(0))
    batch_size: int = field(2, check=greater(0))
    grad_accum_steps: int = field(4, check=greater(0))  # optimizer step every grad_accum_steps batches
    epochs: int = field(3, check=greater(0))
    max_steps: int | None = field(None, check=greater(0))  # optimizer steps; caps the epochs when set
    seed: int = field(42, check=at_least(0))
    compute_dtype: DType = field(DType.BFLOAT16)
    checkpoint_every: int = field(500, check=greater(0), affects_results=False)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum_steps

    @cross_check("warmup_steps", "warmup_fraction")
    def _warmup(self) -> Iterator[Problem]:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            yield Problem("warmup_steps", "set at most one of train.warmup_steps and train.warmup_fraction")


# ---- extraction, SAEs, analysis, report -----------------------------------------------------------


@_frozen
class ExtractConfig(Section):
    """Which residuals go into the delta corpus (layer L = residual after block L, DESIGN.md section 3)."""

    layers: tuple[int, ...] = field((5, 10, 18, 22, 32, 38), check=nonempty_distinct(at_least(0)))
    splits: tuple[str, ...] = field(("probe", "heldout"), check=nonempty_distinct(one_of(SPLIT_NAMES, "split")))
    token_budget: int | None = field(None, check=greater(0))  # None: every kept token of the splits
    subsample_seed: int = field(0, check=at_least(0))
    exclude_bos: bool = field(True)
    store_dtype: DType = field(DType.BFLOAT16)
    store: str | None = field(None, affects_results=False)  # None: inside the run's corpus directory
    batch_size: int = field(8, check=greater(0), affects_results=False)
    chunk_rows: int = field(1024, check=greater(0), affects_results=False)

    @cross_check("store")
    def _store(self) -> Iterator[Problem]:
        url = _URL.match(self.store or "")
        if url and url.group(1) not in KVSTORE_SCHEMES:
            yield Problem(
                "store",
                f"unsupported kvstore scheme '{url.group(1)}://'; use a local path or one "
                f"of {', '.join(s + '://' for s in KVSTORE_SCHEMES)}",
            )


@_frozen
class SaeConfig(Section):
    """SAEs on delta activations (and, with `base_saes`, on h_base for the base-base baseline)."""

    architecture: SaeArchitecture = field(SaeArchitecture.RELU)
    width: int | None = field(16_384, check=greater(0))
    expansion_factor: float | None = field(None, check=greater(0))
    l1: float | None = field(0.15, check=greater(0))  # None: the sweep's coefficient nearest l0_target
    l1_sweep: tuple[float, ...] = field((), check=each(greater(0)))
    l0_target: tuple[float, float] = field((20.0, 50.0), check=each(greater(0)))  # the paper's 20-50 active
    l1_warmup_steps: int = field(0, check=at_least(0))
    k: int | None = field(None, check=greater(0))  # TopK only
    normalize: SaeNormalize = field(SaeNormalize.RMS)
    lr: float = field(1e-4, check=greater(0))
    lr_warmup_steps: int = field(0, check=at_least(0))
    lr_schedule: Schedule = field(Schedule.CONSTANT)
    batch_size: int = field(512, check=greater(0))
    epochs: int | None = field(10, check=greater(0))
    token_budget: int | None = field(None, check=greater(0))
    seeds: tuple[int, ...] = field((0,), check=nonempty_distinct(at_least(0)))
    base_saes: bool = field(True)
    train_split: str = field("probe", check=one_of(SPLIT_NAMES, "split"))
    checkpoint_every: int = field(1000, check=greater(0), affects_results=False)

    @cross_check("width", "expansion_factor")
    def _width(self) -> Iterator[Problem]:
        if (self.width is None) == (self.expansion_factor is None):
            yield Problem(
                "width",
                "set exactly one of sae.width and sae.expansion_factor "
                f"(got {'both' if self.width is not None else 'neither'})",
            )

    @cross_check("epochs", "token_budget")
    def _duration(self) -> Iterator[Problem]:
        if (self.epochs is None) == (self.token_budget is None):
            yield Problem(
                "epochs",
                "set exactly one of sae.epochs and sae.token_budget "
                f"(got {'both' if self.epochs is not None else 'neither'})",
            )

    @cross_check("l1", "l1_sweep")
    def _l1_choice(self) -> Iterator[Problem]:
        if self.l1 is None and not self.l1_sweep:
            yield Problem("l1", "null means 'pick from sae.l1_sweep by sae.l0_target', but sae.l1_sweep is empty")

    @cross_check("l0_target")
    def _l0_target(self) -> Iterator[Problem]:
        lo, hi = self.l0_target
        if lo > hi:
            yield Problem("l0_target", f"expected [low, high] with low <= high, got [{lo}, {hi}]")

    @cross_check("architecture", "k")
    def _topk(self) -> Iterator[Problem]:
        if self.architecture is SaeArchitecture.TOPK and self.k is None:
            yield Problem("k", "required when sae.architecture is 'topk'")
        if self.architecture is not SaeArchitecture.TOPK and self.k is not None:
            yield Problem("k", f"only used with architecture 'topk', not '{self.architecture.value}'; remove it")

    def resolved_width(self, d_model: int) -> int:
        return self.width if self.width is not None else int(round(self.expansion_factor * d_model))


@_frozen
class AnalysisConfig(Section):
    """Geometry against Gemma Scope (when `gemma_scope_dir` is set) and null baselines."""

    gemma_scope_dir: str | None = field(None)  # holds layer_L/<width>/average_l0_N/params.npz
    gemma_scope_width: str = field("width_16k")
    gemma_scope_l0: Mapping[int, int] = field(GEMMA_SCOPE_9B_L0, check=layer_l0())
    # layer -> an SAE directory in any format `lgeo_jax.sae.load_sae` reads (SAELens, sparsify, a Gemma Scope
    # params.npz folder, ours): the reference dictionary for that layer instead of Gemma Scope
    dictionary_dirs: Mapping[int, str] = field(types.MappingProxyType({}))
    max_cosine_chunk: int = field(512, check=greater(0), affects_results=False)
    subspace_k: int = field(256, check=greater(0))
    near_orthogonal_deg: float = field(70.0, check=in_range(0.0, 90.0))
    aligned_deg: float = field(30.0, check=in_range(0.0, 90.0))
    active_threshold: float = field(0.0, check=at_least(0))
    null_samples: int = field(8, check=greater(0))
    null_seed: int = field(0, check=at_least(0))
    eval_split: str = field("heldout", check=one_of(SPLIT_NAMES, "split"))

    @cross_check("aligned_deg", "near_orthogonal_deg")
    def _thresholds(self) -> Iterator[Problem]:
        if self.aligned_deg >= self.near_orthogonal_deg:
            yield Problem(
                "aligned_deg",
                f"must be below near_orthogonal_deg ({self.near_orthogonal_deg:g}), got {self.aligned_deg:g}",
            )

    def has_external_dictionary(self, layer: int) -> bool:
        """True when `layer`'s reference dictionary comes from outside the run (else: our base-SAE export)."""
        return layer in self.dictionary_dirs or self.gemma_scope_dir is not None

    def gemma_scope_params(self, layer: int) -> str:
        """Relative path of the Gemma Scope SAE used for `layer`."""
        return f"layer_{layer}/{self.gemma_scope_width}/average_l0_{self.gemma_scope_l0[layer]}/params.npz"


@_frozen
class ReportConfig(Section):
    """Tables 4-12 and plots, side by side with the paper's numbers when `paper_tables`."""

    title: str | None = field(None)
    paper_tables: bool = field(True)
    plots: bool = field(True)
    plot_format: PlotFormat = field(PlotFormat.PNG)


@_frozen
class StudyConfig(Section):
    """The whole study. `run_dir` holds one directory per stage (see `lgeo_jax.manifest`).

    Cross-section checks run for every combination of sections that is itself valid, so a bad
    `sae` section does not hide an out-of-range `extract.layers`.
    """

    run_dir: str = field("runs/study", affects_results=False)
    model: ModelConfig = field(REQUIRED)
    data: DataConfig = field(DataConfig())
    lora: LoraConfig = field(LoraConfig())
    train: TrainConfig = field(TrainConfig())
    extract: ExtractConfig = field(ExtractConfig())
    sae: SaeConfig = field(SaeConfig())
    analysis: AnalysisConfig = field(AnalysisConfig())
    report: ReportConfig = field(ReportConfig())

    @cross_check("model", "extract")
    def _layers_exist(self) -> Iterator[Problem]:
        n_layers = self.model.known_n_layers
        for i, layer in enumerate(self.extract.layers):
            if n_layers is not None and layer >= n_layers:
                yield Problem(
                    f"extract.layers[{i}]",
                    f"layer {layer} is out of range for a model with {n_layers} layers (valid 0..{n_layers - 1})",
                )

    @cross_check("extract", "sae")
    def _sae_split_extracted(self) -> Iterator[Problem]:
        if self.sae.train_split not in self.extract.splits:
            yield Problem(
                "sae.train_split",
                f"split {self.sae.train_split!r} is not extracted; add it to "
                f"extract.splits {list(self.extract.splits)}",
            )

    @cross_check("extract", "analysis")
    def _analysis_inputs(self) -> Iterator[Problem]:
        if self.analysis.eval_split not in self.extract.splits:
            yield Problem(
                "analysis.eval_split",
                f"split {self.analysis.eval_split!r} is not extracted; add it "
                f"to extract.splits {list(self.extract.splits)}",
            )
        missing = [layer for layer in self.extract.layers
                   if layer not in self.analysis.gemma_scope_l0 and layer not in self.analysis.dictionary_dirs]
        if self.analysis.gemma_scope_dir is not None and missing:
            yield Problem(
                "analysis.gemma_scope_l0",
                f"no Gemma Scope L0 for layer(s) {missing} of extract.layers; add `<layer>: <L0>` entries",
            )

    @cross_check("model", "sae", "analysis")
    def _sizes(self) -> Iterator[Problem]:
        d_model = self.model.known_d_model
        if d_model is None:
            return
        width = self.sae.resolved_width(d_model)
        if self.analysis.subspace_k > min(d_model, width):
            yield Problem(
                "analysis.subspace_k",
                f"{self.analysis.subspace_k} exceeds min(d_model, SAE width) = {min(d_model, width)}",
            )
        if self.sae.k is not None and self.sae.k > width:
            yield Problem("sae.k", f"{self.sae.k} exceeds the SAE width {width}")

    @cross_check("model", "data")
    def _tokenizer(self) -> Iterator[Problem]:
        if self.model.is_builtin and self.data.tokenizer is None and not self.data.is_synthetic:
            yield Problem(
                "data.tokenizer",
                f"'{BUILTIN_MODEL}' has no tokenizer of its own; use data.source "
                f"'{BUILTIN_DATA}' or set data.tokenizer to a tokenizer directory",
            )
