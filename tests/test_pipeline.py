"""The pipeline registry and its one loop: each shipped config's sections are the packages' own configs, and
every stage receives exactly those objects."""

import ast
import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import re

import jax
import pytest
import yaml

from lgeo_jax.analysis import AnalysisConfig, SpliceConfig
from lgeo_jax.config import from_dict
from lgeo_jax.corpus import ExtractConfig
from lgeo_jax.crosscoder import CrosscoderConfig
from lgeo_jax.data import DataConfig
from lgeo_jax.files import lock_holder
from lgeo_jax.lora import LoraConfig
from lgeo_jax.model import ModelConfig
from lgeo_jax.report import ReportConfig
from lgeo_jax.sae import SAETrainConfig
from lgeo_jax.stages import (
    PIPELINE,
    STAGE_NAMES,
    ResourceError,
    check_resources,
    open_run,
    run_stages,
    stage_needs,
    upstream_of,
)
from lgeo_jax.study import SECTION_NAMES, load_config
from lgeo_jax.train import TrainConfig

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PACKAGE_CONFIGS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
                   "extract": ExtractConfig, "sae": SAETrainConfig, "crosscoder": CrosscoderConfig,
                   "splice": SpliceConfig, "analysis": AnalysisConfig, "report": ReportConfig}


def test_every_section_has_a_package_config():
    assert set(PACKAGE_CONFIGS) == set(SECTION_NAMES)
    assert {s for stage in PIPELINE for s in stage.sections} == set(SECTION_NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_stage_receives_the_package_configs_as_validated(path, tmp_path):
    # the stages are stand-ins: a paper-size config need not fit this machine
    config = load_config(path, [f"run_dir={tmp_path}", "resources.check=false"])
    raw = yaml.safe_load(path.read_text())
    for name, cls in PACKAGE_CONFIGS.items():
        section = getattr(config, name)
        assert type(section) is cls  # the study nests the package's own class, not a mirror of it
        assert section == from_dict(cls, raw.get(name) or {})  # and validates its YAML exactly as the package does

    received = {}

    def recorder(name):
        def run(cfg, stage, run):
            received[name] = (cfg, stage.path)
        return run

    pipeline = tuple(dataclasses.replace(s, run=recorder(s.name)) for s in PIPELINE)
    outcomes = run_stages(config, pipeline=pipeline, echo=lambda line: None)
    assert [o.name for o in outcomes] == list(STAGE_NAMES) and all(o.ran for o in outcomes)
    for spec in PIPELINE:
        cfg, stage_path = received[spec.name]
        assert cfg is config and stage_path == tmp_path / spec.name
        for section in spec.sections:
            assert getattr(cfg, section) is getattr(config, section)
    assert (tmp_path / "config.yaml").is_file()
    # a second pass finds everything complete and runs nothing
    received.clear()
    assert not any(o.ran for o in run_stages(config, pipeline=pipeline, echo=lambda line: None)) and not received
    assert all(c.state.value == "complete" for c in open_run(config, pipeline).plan())


def test_a_failing_stage_restores_its_previous_output(tmp_path):
    config = load_config(CONFIGS[0].parent / "micro.yaml", [f"run_dir={tmp_path}"])

    def write(cfg, stage, run):
        (stage.path / "result.txt").write_text("first")

    def fail(cfg, stage, run):
        (stage.path / "result.txt").write_text("half")
        raise ValueError("bad input")

    ok = tuple(dataclasses.replace(s, run=write) for s in PIPELINE)
    run_stages(config, "corpus", pipeline=ok, echo=lambda line: None)
    broken = tuple(dataclasses.replace(s, run=fail if s.name == "corpus" else write) for s in PIPELINE)
    with pytest.raises(ValueError, match="bad input"):
        run_stages(config, "corpus", force=("corpus",), pipeline=broken, echo=lambda line: None)
    assert (tmp_path / "corpus" / "result.txt").read_text() == "first"
    assert open_run(config, ok).check("corpus").state.value == "complete"


def test_upstream_of():
    assert upstream_of("corpus") == ("data", "base", "adapters", "corpus")
    assert upstream_of("report") == STAGE_NAMES
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        upstream_of("nope")


# ---- every config value a stage reads is in its identity (derived from the code, not a hand list) --------


class ReadRecorder:
    """Records which config attributes code reads, as dotted paths (`sae.lr`, `analysis.has_external_dictionary`):
    while `recording(label)` is active, every class of the config's tree reads through a recording
    `__getattribute__`, and an access on one of the config's own objects is noted under `label` (navigating to
    a sub-section is not a read; what is read inside it is)."""

    def __init__(self, config):
        self.paths: dict[int, str] = {}
        self._keep = []  # the objects, alive while their ids are in `paths`
        self._walk(config, "")
        self.reads: dict[str, set[str]] = collections.defaultdict(set)
        self._label = None

    def _walk(self, obj, path):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self.paths[id(obj)] = path
            self._keep.append(obj)
            for f in dataclasses.fields(obj):
                self._walk(object.__getattribute__(obj, f.name), f"{path}.{f.name}" if path else f.name)

    @contextlib.contextmanager
    def recording(self, label):
        classes = {type(o) for o in self._keep}
        originals = {cls: cls.__getattribute__ for cls in classes}
        recorder = self

        def make(original):
            def getattribute(obj, name):
                value = original(obj, name)
                path = recorder.paths.get(id(obj))
                if (path is not None and recorder._label is not None and not name.startswith("__")
                        and id(value) not in recorder.paths):
                    recorder.reads[recorder._label].add(f"{path}.{name}" if path else name)
                return value
            return getattribute

        for cls, original in originals.items():
            cls.__getattribute__ = make(original)
        self._label = label
        try:
            yield
        finally:
            self._label = None
            for cls, original in originals.items():
                cls.__getattribute__ = original


def _covered_sections(name):
    """The stage's own sections and those of every stage upstream (a change there reruns an input)."""
    return {s for spec in PIPELINE if spec.name in upstream_of(name) for s in spec.sections}


def _is_field(config, path):
    obj = config
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def _is_operational(config, path):
    """A field marked `affects_results=False` (a batch size for inference, a checkpoint interval)."""
    *parents, last = path.split(".")
    obj = config
    for part in parents:
        obj = getattr(obj, part)
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}
    return last in meta and not meta[last].get("affects_results", True)


def _uncovered(config, name, reads, declared):
    """What stage `name` reads that neither its sections, nor an upstream stage's, nor its `reads(config)`
    (whose own reads are `declared`) put into its identity."""
    covered = _covered_sections(name)
    return sorted(p for p in reads if p.split(".")[0] not in covered and p not in declared
                  and not (_is_field(config, p) and _is_operational(config, p)))


def _declared(config, recorder):
    for spec in PIPELINE:
        with recorder.recording(f"reads:{spec.name}"):
            spec.reads(config)
    return {spec.name: recorder.reads[f"reads:{spec.name}"] for spec in PIPELINE}


def _config_chains(source):
    """`config.<section>[.<field>]` attribute chains in Python source: the stage functions' direct reads, in every
    branch (a section alone, `data = config.data`, stands for everything read from it later)."""
    tree = ast.parse(source)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    chains = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # the outermost attribute of a chain
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "config":
                chains.add(".".join(reversed(parts[-2:])))  # section.field (or .method / .property)
    return chains


STAGE_MODULES = {name: pathlib.Path(__file__).resolve().parents[1] / "lgeo_jax" / "stages" / f"_{name}.py"
                 for name in ("data", "base", "adapters", "corpus", "saes", "crosscoders", "evaluate", "analysis",
                              "report")}


def test_direct_config_reads_of_every_stage_module_are_in_its_identity():
    config = load_config(CONFIGS[0].parent / "micro.yaml")
    declared = _declared(config, ReadRecorder(config))
    # `reads` short-circuits on sae.base_saes; without it every branch of the functions it calls is taken
    other = load_config(CONFIGS[0].parent / "micro.yaml", ["sae.base_saes=false"])
    for name, paths in _declared(other, ReadRecorder(other)).items():
        declared[name] |= paths
    assert "analysis.eval_split" in declared["saes"] and "report.plots" in declared["adapters"]
    for name, module in STAGE_MODULES.items():
        chains = _config_chains(module.read_text())
        assert chains, module  # the walk finds the module's reads
        assert _uncovered(config, name, chains, declared[name]) == [], name
    # the check can fail: the corpus stage reading an analysis value would be caught
    planted = _config_chains("def run_corpus(config, stage, run):\n    k = config.analysis.subspace_k\n")
    assert _uncovered(config, "corpus", planted, declared["corpus"]) == ["analysis.subspace_k"]


@pytest.mark.slow  # a real (shortened) micro study in-process: over a minute on 2 cores
def test_every_config_value_a_stage_reads_at_run_time_is_in_its_identity(tmp_path):
    """The real stage functions on a shortened micro study, every config read recorded (through the library
    functions they call too)."""
    config = load_config(CONFIGS[0].parent / "micro.yaml", [
        f"run_dir={tmp_path}", "model.builtin.pretrain_steps=2", "train.max_steps=2", "sae.epochs=1"])
    recorder = ReadRecorder(config)
    declared = _declared(config, recorder)

    def recorded(spec):
        def run(cfg, stage, run):
            with recorder.recording(spec.name):
                spec.run(cfg, stage, run)
        return run

    pipeline = tuple(dataclasses.replace(s, run=recorded(s)) for s in PIPELINE)
    run_stages(config, pipeline=pipeline, echo=lambda line: None)
    for spec in PIPELINE:
        reads = {p for p in recorder.reads[spec.name] if _is_field(config, p)}
        assert reads, spec.name
        assert _uncovered(config, spec.name, reads, declared[spec.name]) == [], spec.name
    # reads from other sections were seen, and each is declared (the test is not vacuous)
    assert {"analysis.eval_split", "report.plots"} <= recorder.reads["saes"]
    assert "report.plots" in recorder.reads["adapters"]


# ---- what run_stages says, and what it refuses before starting --------------------------------------------


def _writing(log=None):
    def write(cfg, stage, run):
        (stage.path / "result.txt").write_text(stage.path.name)
        if log is not None:
            log.append(stage.path.name)
    return tuple(dataclasses.replace(s, run=write) for s in PIPELINE)


def test_a_rerun_says_on_stdout_which_stages_rerun_and_why(tmp_path):
    config = load_config(CONFIGS[0].parent / "micro.yaml", [f"run_dir={tmp_path}"])
    run_stages(config, pipeline=_writing(), echo=lambda line: None)
    lines = []
    changed = load_config(CONFIGS[0].parent / "micro.yaml",
                          [f"run_dir={tmp_path}", "analysis.gemma_scope_width=width_65k"])
    run_stages(changed, pipeline=_writing(), echo=lines.append)
    assert lines == ["[data] complete, skipped", "[base] complete, skipped", "[adapters] complete, skipped",
                     "[corpus] complete, skipped", "[saes] complete, skipped",
                     "[crosscoders] complete, skipped", "[evaluate] complete, skipped",
                     "[analysis] config section 'analysis' changed: rerunning ...",
                     "[report] input 'analysis' will rerun: rerunning ..."]


def test_a_run_that_cannot_fit_is_refused_before_any_stage_starts(tmp_path):
    ran = []
    micro = CONFIGS[0].parent / "micro.yaml"
    config = load_config(micro, [f"run_dir={tmp_path}", "sae.width=4000000000"])
    with pytest.raises(ResourceError) as refused:
        run_stages(config, pipeline=_writing(ran), echo=lambda line: None)
    assert ran == [] and not (tmp_path / "data").exists()  # nothing started, nothing written
    message = str(refused.value)
    assert "\n" not in message and "resources.check=false" in message
    need, have, width = re.search(r"stage saes needs at least ([\d,.]+) GiB per device .* for training 6 SAEs of width "
                                  r"4,000,000,000.*?this machine has ([\d,.]+) GiB; an SAE width of at most ([\d,]+) "
                                  r"would fit", message).groups()
    # float32 parameters, gradients and two Adam moments of W_enc and W_dec alone, for the SAEs on one device
    n_dev = jax.device_count()
    per_device = -(-6 // math.gcd(6, n_dev))
    assert float(need.replace(",", "")) * 2**30 >= per_device * 2 * 32 * 4e9 * 4 * 4
    assert float(have.replace(",", "")) * 2**30 <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert int(width.replace(",", "")) > 0
    # on a machine with 2 GiB per device (and room elsewhere), the width it names fits and a larger one does not
    machine = ["resources.device_memory_gib=2", "resources.host_memory_gib=1e6", "resources.disk_gib=1e6"]
    with pytest.raises(ResourceError) as refused:
        check_resources(load_config(micro, [f"run_dir={tmp_path}", "sae.width=4000000000", *machine]), ["saes"])
    width = int(re.search(r"this machine has 2.00 GiB; an SAE width of at most ([\d,]+) would fit",
                          str(refused.value)).group(1).replace(",", ""))
    check_resources(load_config(micro, [f"run_dir={tmp_path}", f"sae.width={width}", *machine]), ["saes"])
    with pytest.raises(ResourceError, match="per device"):
        check_resources(load_config(micro, [f"run_dir={tmp_path}", f"sae.width={int(width * 1.01)}", *machine]),
                        ["saes"])
    # the override proceeds
    allowed = load_config(micro, [f"run_dir={tmp_path}", "sae.width=4000000000", "resources.check=false"])
    run_stages(allowed, "data", pipeline=_writing(ran), echo=lambda line: None)
    assert ran == ["data"]
    # a disk too small for the corpus: refused, with a token budget that does fit
    small_disk = [f"run_dir={tmp_path}", "resources.disk_gib=0.005"]
    with pytest.raises(ResourceError) as refused:
        run_stages(load_config(micro, small_disk), pipeline=_writing(ran), echo=lambda line: None)
    assert ran == ["data"]
    budget = re.search(r"write [\d.]+ GiB \(most: the corpus .*\) but .* has 0.00 GiB free; an extract.token_budget of "
                       r"at most ([\d,]+) would fit", str(refused.value)).group(1).replace(",", "")
    stages = [s.name for s in PIPELINE]
    check_resources(load_config(micro, [*small_disk, f"extract.token_budget={budget}"]), stages)
    with pytest.raises(ResourceError):
        check_resources(load_config(micro, [*small_disk, f"extract.token_budget={int(int(budget) * 1.05)}"]), stages)


def test_planned_sae_memory_uses_the_mesh_the_trainer_makes():
    from lgeo_jax.sae import default_mesh, estimate_sae_memory

    for seeds in ("[0]", "[0, 1, 2]"):
        config = load_config(CONFIGS[0].parent / "micro.yaml", [f"sae.seeds={seeds}"])
        n = (len(config.lora.ranks) + 1) * len(config.extract.layers) * len(config.sae.seeds)  # delta + base SAEs
        main = estimate_sae_memory(32, 64, n, config.sae.batch_size, default_mesh(n), arch=config.sae.architecture)
        assert stage_needs(config, jax.device_count())["saes"].device == main.total


def test_planned_crosscoder_memory_is_an_sae_job_of_twice_the_width_input():
    """A crosscoder job trains like SAEs of input [h_base; h_adapted]: the same estimate at d_in = 2 d_model,
    on the mesh the trainer makes; off, the stage needs nothing."""
    from lgeo_jax.sae import Arch, default_mesh, estimate_sae_memory

    config = load_config(CONFIGS[0].parent / "micro.yaml", ["crosscoder.enabled=true", "crosscoder.seeds=[0, 1]"])
    c = config.crosscoder
    n = len(config.lora.ranks) * len(config.extract.layers) * 2
    want = estimate_sae_memory(2 * 32, c.width, n, c.batch_size, default_mesh(n), arch=Arch.BATCHTOPK)
    assert stage_needs(config, jax.device_count())["crosscoders"].device == want.total
    off = load_config(CONFIGS[0].parent / "micro.yaml", ["crosscoder.enabled=false"])
    assert stage_needs(off, jax.device_count())["crosscoders"].device == 0


def test_run_stages_holds_the_run_directory_lock(tmp_path):
    config = load_config(CONFIGS[0].parent / "micro.yaml", [f"run_dir={tmp_path}"])
    seen = []

    def look(cfg, stage, run):
        seen.append(lock_holder(tmp_path))

    pipeline = tuple(dataclasses.replace(s, run=look) for s in PIPELINE)
    run_stages(config, "data", pipeline=pipeline, echo=lambda line: None)
    assert seen[0].startswith(f"pid {os.getpid()} on host") and "stages up to data" in seen[0]
    assert lock_holder(tmp_path) is None
