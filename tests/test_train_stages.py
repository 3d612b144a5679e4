"""The `base` and `adapters` stages on a run directory: the micro study end to end, resume, bad inputs."""

import json
import shutil

import numpy as np
import pytest
from hf_tiny import SPECS, build_hf_model, save_hf_model

import lgeo_jax
from lgeo_jax.config import config_from_dict, load_config
from lgeo_jax.data import write_synthetic_dataset
from lgeo_jax.manifest import Run
from lgeo_jax.stages._adapters import run_adapters
from lgeo_jax.stages._base import run_base
from lgeo_jax.stages._inputs import adapter_dirs, base_checkpoint


def write_data_stage(run, config, n_records):
    stage = run.begin("data")
    ds = write_synthetic_dataset(stage.path, n_records=n_records, seed=0, vocab_size=512)
    shutil.copy(ds.records_path, stage.path / "records.json")
    stage.finish()


def run_stage(run, config, name, fn):
    stage = run.begin(name)
    fn(config, stage, run)
    stage.finish()
    return stage


def test_base_stage_validates_a_real_checkpoint(tmp_path):
    save_hf_model(build_hf_model(SPECS[0]), tmp_path / "hf")
    raw = {"run_dir": str(tmp_path / "run"), "model": {"checkpoint": str(tmp_path / "hf"), "n_layers": 3},
           "data": {"source": "builtin:synthetic", "n_records": 40, "train": [0, 20], "probe": [0, 10],
                    "heldout": [20, 30]},
           "extract": {"layers": [0, 1]}, "analysis": {"subspace_k": 8}}
    config = config_from_dict(raw)
    run = Run(config.run_dir, config)
    write_data_stage(run, config, 40)
    stage = run_stage(run, config, "base", run_base)
    assert stage.progress["checkpoint"] == str((tmp_path / "hf").resolve())
    assert (stage.progress["n_layers"], stage.progress["d_model"]) == (3, SPECS[0].d_model)
    wrong = config_from_dict({**raw, "model": {**raw["model"], "n_layers": 4}})
    run = Run(wrong.run_dir, wrong)
    with pytest.raises(ValueError, match=r"model.n_layers is 4 but the checkpoint .* has n_layers=3"):
        run_base(wrong, run.begin("base", force=True), run)


@pytest.mark.slow
def test_micro_study_base_and_adapters_end_to_end(tmp_path):
    config = load_config("configs/micro.yaml", [f"run_dir={tmp_path / 'run'}"])
    run = Run(config.run_dir, config)
    write_data_stage(run, config, config.data.synthetic_records)
    base = run_stage(run, config, "base", run_base)
    assert base.progress["pretrain_loss_last"] < base.progress["pretrain_loss_first"]
    lgeo_jax.load_model(base_checkpoint(run, config))  # a valid HF checkpoint
    stage = run_stage(run, config, "adapters", run_adapters)
    summary = json.loads((stage.path / "summary.json").read_text())
    for name, path in zip(["r2", "r4"], adapter_dirs(run, config), strict=True):
        adapter = lgeo_jax.load_adapter(path)
        assert adapter.ranks == (int(name[1:]),)
        s = summary["adapters"][name]
        assert s["trainable_params"] == adapter.trainable_count()[0]
        assert s["mean_logit_delta_norm"] > 0 and s["heldout_loss_after"] != s["heldout_loss_before"]
        assert np.isfinite(s["final_train_loss"])
    header = (stage.path / "loss.csv").read_text().splitlines()[0]
    assert header == "step,r2,r4,lr" and len((stage.path / "loss.csv").read_text().splitlines()) == 11

    # split ranges beyond the data: the records file has 300 records, this config asks for 400
    bigger = load_config("configs/micro.yaml", [f"run_dir={tmp_path / 'run'}", "data.n_records=400",
                                                "data.train=[0,380]", "data.heldout=[380,400]"])
    run = Run(bigger.run_dir, bigger)
    with pytest.raises(ValueError, match=r"split 'train' needs indices 0..379 but the dataset has only 300"):
        run_adapters(bigger, run.begin("adapters", force=True), run)
