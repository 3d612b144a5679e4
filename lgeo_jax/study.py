"""The study's configuration: every package's own section, nested, plus the checks that span sections.

`StudyConfig` defines no setting itself: `model` is `lgeo_jax.model.ModelConfig`, `data` is
`lgeo_jax.data.DataConfig`, `lora` / `train` / `extract` / `sae` / `analysis` / `report` are the configs
of `lgeo_jax.lora`, `lgeo_jax.train`, `lgeo_jax.corpus`, `lgeo_jax.sae`, `lgeo_jax.analysis` and
`lgeo_jax.report` (`crosscoder`: `lgeo_jax.crosscoder`; `splice`: `lgeo_jax.analysis`). What lives here is
what no single package can check: layers against the model's depth, splits the later stages need, sizes
that involve the model and the SAE, (when asked) that the files the config points at exist, `mesh`
(`lgeo_jax.sharding.MeshConfig`: how every stage splits the devices into data x fsdp x model; layout only,
so no stage hash includes it), and `resources`: what the run may assume of the machine, which `lgeo run`
compares with the plan's memory and disk before any stage starts (`lgeo_jax.stages`, a layer above, owns
that check but cannot nest a section of its own here).

Typical use::

    config = load_config("configs/tiny.yaml", ["sae.l1=0.1"])   # raises ConfigError listing every problem
    hashes = section_hashes(config)                             # what each stage's manifest records
    print(dump_config(config))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lgeo_jax.analysis import AnalysisConfig, SpliceConfig
from lgeo_jax.config import (
    REQUIRED,
    Problem,
    Section,
    cross_check,
    dump_yaml,
    field,
    from_dict,
    from_yaml,
    greater,
    is_placeholder,
    load_yaml,
    section,
    section_hash,
)
from lgeo_jax.corpus import ExtractConfig
from lgeo_jax.crosscoder import CrosscoderConfig
from lgeo_jax.data import BUILTIN_DATA, DataConfig
from lgeo_jax.files import read_json
from lgeo_jax.lora import LoraConfig
from lgeo_jax.model import BUILTIN_MODEL, ModelConfig
from lgeo_jax.report import ReportConfig
from lgeo_jax.sae import SAETrainConfig
from lgeo_jax.sharding import MeshConfig
from lgeo_jax.train import TrainConfig

SECTION_NAMES = ("model", "data", "lora", "train", "extract", "sae", "crosscoder", "splice", "analysis", "report")
"""StudyConfig's hashable sections, in pipeline order (run_dir is where, not what)."""


@section
class ResourceConfig(Section):
    """What `lgeo run` may assume of this machine. Before any stage starts, the plan's device memory, host
    memory and disk are compared with these (None: detected) and a run that cannot fit is refused, with the
    figures; `check: false` proceeds anyway. Operational only: no result depends on them."""

    check: bool = field(True, affects_results=False)
    device_memory_gib: float | None = field(None, check=greater(0), affects_results=False)  # per device
    host_memory_gib: float | None = field(None, check=greater(0), affects_results=False)
    disk_gib: float | None = field(None, check=greater(0), affects_results=False)  # free, where outputs go


@section
class StudyConfig(Section):
    """The whole study. `run_dir` holds one directory per stage (see `lgeo_jax.stages`).

    Cross-section checks run for every combination of sections that is itself valid, so a bad
    `sae` section does not hide an out-of-range `extract.layers`.
    """

    run_dir: str = field("runs/study", affects_results=False)
    model: ModelConfig = field(REQUIRED)
    data: DataConfig = field(DataConfig())
    lora: LoraConfig = field(LoraConfig())
    train: TrainConfig = field(TrainConfig())
    extract: ExtractConfig = field(ExtractConfig())
    sae: SAETrainConfig = field(SAETrainConfig())
    crosscoder: CrosscoderConfig = field(CrosscoderConfig())  # trains on sae.train_split, analysed on eval_split
    splice: SpliceConfig = field(SpliceConfig())  # the evaluate stage, on analysis.eval_split prompts
    analysis: AnalysisConfig = field(AnalysisConfig())
    report: ReportConfig = field(ReportConfig())
    resources: ResourceConfig = field(ResourceConfig())
    mesh: MeshConfig = field(MeshConfig())  # how the devices split; never hashed (layout only)

    @cross_check("model", "extract")
    def _layers_exist(self) -> Iterator[Problem]:
        n_layers = self.model.known_n_layers
        for i, layer in enumerate(self.extract.layers):
            if n_layers is not None and layer >= n_layers:
                yield Problem(
                    f"extract.layers[{i}]",
                    f"layer {layer} is out of range for a model with {n_layers} layers (valid 0..{n_layers - 1})",
                )

    @cross_check("extract", "sae", "analysis")
    def _splits_extracted(self) -> Iterator[Problem]:
        needed = (("sae.train_split", self.sae.train_split), ("analysis.eval_split", self.analysis.eval_split))
        for key, split in needed:
            if split not in self.extract.splits:
                yield Problem(key, f"split {split!r} is not extracted; add it to extract.splits "
                                   f"{list(self.extract.splits)}")

    @cross_check("extract", "analysis")
    def _gemma_scope_layers(self) -> Iterator[Problem]:
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
        if self.sae.width is None and self.sae.k is not None and self.sae.k > width:  # explicit widths: sae checks
            yield Problem("sae.k", f"{self.sae.k} exceeds the SAE width {width}")

    @cross_check("model", "data")
    def _tokenizer(self) -> Iterator[Problem]:
        if self.model.is_builtin and self.data.tokenizer is None and not self.data.is_synthetic:
            yield Problem(
                "data.tokenizer",
                f"'{BUILTIN_MODEL}' has no tokenizer of its own; use data.source "
                f"'{BUILTIN_DATA}' or set data.tokenizer to a tokenizer directory",
            )

    def path_problems(self) -> list[Problem]:
        """Every missing or placeholder path, with what to do about it (relative paths: from the current
        directory). The shipped paper configs carry `FILL_IN: ...` placeholders so they validate anywhere; a
        stage that reads the checkpoint or Gemma Scope checks them and the user learns exactly what to fill in."""
        return [*_checkpoint_problems(self), *_data_problems(self), *_dictionary_problems(self)]


def _placeholder(path: str, value: str, what: str, example: str) -> Problem:
    return Problem(path, f"still the placeholder {value!r}; set it to {what}, e.g. --set {path}={example}")


def _checkpoint_problems(config: StudyConfig) -> Iterator[Problem]:
    model = config.model
    if model.is_builtin:
        return
    if is_placeholder(model.checkpoint):
        yield _placeholder("model.checkpoint", model.checkpoint, "a local Hugging Face Gemma-2 checkpoint "
                           "directory (huggingface-cli download google/gemma-2-9b --local-dir DIR)", "/data/gemma-2-9b")
        return
    cfg_path = os.path.join(model.checkpoint, "config.json")
    if not os.path.isdir(model.checkpoint):
        yield Problem("model.checkpoint", f"directory {model.checkpoint!r} not found")
        return
    try:
        hf = read_json(cfg_path, needed_by="a Hugging Face checkpoint directory")
    except (OSError, ValueError) as e:
        yield Problem("model.checkpoint", str(e))
        return
    if not isinstance(hf, dict):
        yield Problem("model.checkpoint", f"{cfg_path}: expected a JSON object, got {type(hf).__name__}")
        return
    actual = {"n_layers": hf.get("num_hidden_layers"), "d_model": hf.get("hidden_size")}
    for name, value in actual.items():
        declared = getattr(model, name)
        if declared is not None and value is not None and declared != value:
            yield Problem(f"model.{name}", f"declared {declared} but {cfg_path} says {value}")
    n_layers = actual["n_layers"]
    if model.n_layers is None and isinstance(n_layers, int):
        for i, layer in enumerate(config.extract.layers):
            if layer >= n_layers:
                yield Problem(f"extract.layers[{i}]", f"layer {layer} is out of range for {model.checkpoint} "
                                                      f"({n_layers} layers, valid 0..{n_layers - 1})")


def _data_problems(config: StudyConfig) -> Iterator[Problem]:
    data = config.data
    if data.is_local_file:
        if is_placeholder(data.source):
            yield _placeholder("data.source", data.source, "a local alpaca_data.json", "/data/alpaca_data.json")
        elif not os.path.isfile(data.source):
            yield Problem("data.source", f"file {data.source!r} not found")
    if data.tokenizer is not None:
        if is_placeholder(data.tokenizer):
            yield _placeholder("data.tokenizer", data.tokenizer, "a tokenizer directory", "/data/gemma-2-9b")
        elif not os.path.isdir(data.tokenizer):
            yield Problem("data.tokenizer", f"directory {data.tokenizer!r} not found (AutoTokenizer loads a directory)")


def _dictionary_problems(config: StudyConfig) -> Iterator[Problem]:
    analysis = config.analysis
    for layer, directory in analysis.dictionary_dirs.items():
        if not os.path.isdir(directory):
            yield Problem(f"analysis.dictionary_dirs.{layer}", f"SAE directory {directory!r} not found")
    root = analysis.gemma_scope_dir
    if root is None:
        return
    if is_placeholder(root):
        yield _placeholder("analysis.gemma_scope_dir", root, "a local copy of google/gemma-scope-9b-pt-res (or null "
                           "to skip the Gemma Scope comparisons)", "/data/gemma-scope-9b-pt-res")
        return
    if not os.path.isdir(root):
        yield Problem("analysis.gemma_scope_dir", f"directory {root!r} not found")
        return
    missing = [str(analysis.gemma_scope_params(layer)) for layer in config.extract.layers
               if layer not in analysis.dictionary_dirs
               and not os.path.isfile(os.path.join(root, analysis.gemma_scope_params(layer)))]
    if missing:
        yield Problem("analysis.gemma_scope_dir",
                      f"{root!r} lacks {', '.join(missing)}; download those folders or change analysis.gemma_scope_l0")


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *, check_paths: bool = False) -> StudyConfig:
    """Reads and validates a study config; raises one `ConfigError` naming every problem.

    `overrides` are `dotted.key=value` strings (value parsed as YAML, e.g. `extract.layers=[5,10]`).
    `check_paths` also requires the checkpoint, data, tokenizer and Gemma Scope paths to exist (stages that
    read them ask for it; `lgeo plan` does not).
    """
    return load_yaml(StudyConfig, path, overrides, check_paths=check_paths)


def config_from_yaml(text: str, overrides: Iterable[str] = (), *, check_paths: bool = False,
                     source: str = "<yaml>") -> StudyConfig:
    return from_yaml(StudyConfig, text, overrides, check_paths=check_paths, source=source)


def config_from_dict(raw: Mapping[str, Any], overrides: Iterable[str] = (), *, check_paths: bool = False,
                     source: str = "<dict>") -> StudyConfig:
    return from_dict(StudyConfig, raw, overrides, check_paths=check_paths, source=source)


def dump_config(config: StudyConfig) -> str:
    """The config as YAML (every field, defaults included); loading it gives an equal config."""
    return dump_yaml(config)


def section_hashes(config: StudyConfig, names: tuple[str, ...] = SECTION_NAMES) -> dict[str, str]:
    """Section name -> its hash (`lgeo_jax.config.section_hash`): what a stage's manifest records."""
    unknown = [n for n in names if n not in SECTION_NAMES]
    if unknown:
        raise ValueError(f"section_hashes: unknown section(s) {unknown}; expected {', '.join(SECTION_NAMES)}")
    return {name: section_hash(name, getattr(config, name)) for name in names}
