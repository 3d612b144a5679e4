"""The `base` and `adapters` stages on a run directory: the micro study end to end, resume, bad inputs."""

import json

import numpy as np
import pytest
from hf_tiny import SPECS, build_hf_model, save_hf_model

import lgeo_jax
from lgeo_jax.stages import adapter_dirs, base_checkpoint, open_run, records_path, run_stages
from lgeo_jax.study import config_from_dict, load_config


def quiet(config, target, **kw):
    return run_stages(config, target, echo=lambda line: None, **kw)


def test_base_stage_validates_a_real_checkpoint(tmp_path):
    save_hf_model(build_hf_model(SPECS[0]), tmp_path / "hf")
    raw = {"run_dir": str(tmp_path / "run"), "model": {"checkpoint": str(tmp_path / "hf"), "n_layers": 3},
           "data": {"source": "builtin:synthetic", "n_records": 40, "train": [0, 20], "probe": [0, 10],
                    "heldout": [20, 30]},
           "extract": {"layers": [0, 1]}, "analysis": {"subspace_k": 8}}
    config = config_from_dict(raw)
    quiet(config, "base")
    progress = open_run(config).manifest("base").progress
    assert progress["checkpoint"] == str((tmp_path / "hf").resolve())
    assert (progress["n_layers"], progress["d_model"]) == (3, SPECS[0].d_model)
    wrong = config_from_dict({**raw, "model": {**raw["model"], "n_layers": 4}})
    with pytest.raises(ValueError, match=r"model.n_layers is 4 but the checkpoint .* has n_layers=3"):
        quiet(wrong, "base", force=("base",))


@pytest.mark.slow
def test_micro_study_base_and_adapters_end_to_end(tmp_path):
    config = load_config("configs/micro.yaml", [f"run_dir={tmp_path / 'run'}"])
    quiet(config, "adapters")
    run = open_run(config)
    base = run.manifest("base")
    assert base.progress["pretrain_loss_last"] < base.progress["pretrain_loss_first"]
    lgeo_jax.load_model(base_checkpoint(run, config))  # a valid HF checkpoint
    stage_dir = run.stage_dir("adapters")
    summary = json.loads((stage_dir / "summary.json").read_text())
    for name, path in zip(["r2", "r4"], adapter_dirs(run, config), strict=True):
        adapter = lgeo_jax.load_adapter(path)
        assert adapter.ranks == (int(name[1:]),)
        s = summary["adapters"][name]
        assert s["trainable_params"] == adapter.trainable_count()[0]
        assert s["mean_logit_delta_norm"] > 0 and s["heldout_loss_after"] != s["heldout_loss_before"]
        assert np.isfinite(s["final_train_loss"])
    header = (stage_dir / "loss.csv").read_text().splitlines()[0]
    assert header == "step,r2,r4,lr" and len((stage_dir / "loss.csv").read_text().splitlines()) == 11

    # split ranges beyond the data: a 300-record file, a config that asks for 400
    records = tmp_path / "records.json"
    records.write_bytes(records_path(run).read_bytes())
    bigger = load_config("configs/micro.yaml", [f"run_dir={tmp_path / 'run'}", f"data.source={records}",
                                                "data.n_records=null", "data.train=[0,380]", "data.heldout=[380,400]",
                                                "data.tokenizer=" + str(run.stage_dir("data") / "tokenizer")])
    with pytest.raises(ValueError, match=r"has 300 records, but the splits need 400"):
        quiet(bigger, "adapters")
    assert (stage_dir / "summary.json").is_file()  # the failed rerun kept the finished results
