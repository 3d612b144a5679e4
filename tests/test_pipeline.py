"""The pipeline registry and its one loop: each shipped config's sections are the packages' own configs, and
every stage receives exactly those objects."""

import dataclasses
import pathlib

import pytest
import yaml

from lgeo_jax.analysis import AnalysisConfig
from lgeo_jax.config import from_dict
from lgeo_jax.corpus import ExtractConfig
from lgeo_jax.data import DataConfig
from lgeo_jax.lora import LoraConfig
from lgeo_jax.model import ModelConfig
from lgeo_jax.report import ReportConfig
from lgeo_jax.sae import SAETrainConfig
from lgeo_jax.stages import PIPELINE, STAGE_NAMES, open_run, run_stages, upstream_of
from lgeo_jax.study import SECTION_NAMES, load_config
from lgeo_jax.train import TrainConfig

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PACKAGE_CONFIGS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
                   "extract": ExtractConfig, "sae": SAETrainConfig, "analysis": AnalysisConfig, "report": ReportConfig}


def test_every_section_has_a_package_config():
    assert set(PACKAGE_CONFIGS) == set(SECTION_NAMES)
    assert {s for stage in PIPELINE for s in stage.sections} == set(SECTION_NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_stage_receives_the_package_configs_as_validated(path, tmp_path):
    config = load_config(path, [f"run_dir={tmp_path}"])
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
