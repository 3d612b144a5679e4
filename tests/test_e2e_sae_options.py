"""Every `sae` setting the config accepts works through `lgeo run`: each run reuses a finished micro run and
reruns only the saes, analysis and report stages (the `sae` section changed)."""

import json
import shutil

import numpy as np
import pytest
from e2e import MICRO, check_report, figure_rows, lgeo

from lgeo_jax.sae import Arch, load_sae


def rerun(micro_run, tmp_path, *settings: str):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    proc = lgeo("run", str(MICRO), "--out", str(out), *[a for s in settings for a in ("--set", s)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reran = [line.split("]")[0][1:] for line in proc.stdout.splitlines() if line.endswith("running ...")]
    assert reran == ["saes", "crosscoders", "evaluate", "analysis", "report"], proc.stdout
    return out


def _sae_weights(run_dir, name="r2_L0_s0"):
    return load_sae(run_dir / "saes" / "job" / "saes" / name).params["W_dec"]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_lr_schedule_runs(micro_run, tmp_path, schedule):
    out = rerun(micro_run, tmp_path, f"sae.lr_schedule={schedule}")
    check_report(out)
    # the schedule took effect: same data, seeds and init as the constant-schedule run, other weights
    assert not np.allclose(_sae_weights(out), _sae_weights(micro_run))


def test_normalize_none_trains_unnormalised_saes_and_reports_the_pre_norm_arm(micro_run, tmp_path):
    out = rerun(micro_run, tmp_path, "sae.normalize=none")
    saes = sorted((out / "saes" / "job" / "saes").iterdir())
    assert saes and all(load_sae(p).scale == 1.0 for p in saes)
    assert all(load_sae(p).scale != 1.0 for p in (micro_run / "saes" / "job" / "saes").iterdir())
    sweep = json.loads((out / "saes" / "sweep.json").read_text())
    assert sweep["normalize"] == "none"
    assert all(load_sae(p).scale == 1.0 for p in (out / "saes" / "sweep" / "saes").iterdir())
    report = (out / "report" / "report.md").read_text()
    assert "pre-normalisation arm (`sae.normalize: none`" in report
    metrics = {r["metric"] for r in figure_rows(out) if r["table"] == "table12"}
    assert metrics and all(m.startswith("pre_norm.l1=") for m in metrics)
    check_report(out)


def test_topk_runs_with_no_l1_setting(micro_run, tmp_path):
    out = rerun(micro_run, tmp_path, "sae.architecture=topk", "sae.k=4", "sae.l1_sweep=[]")
    saes = sorted((out / "saes" / "job" / "saes").iterdir())
    for path in saes:
        sae = load_sae(path)
        assert sae.cfg.architecture is Arch.TOPK and sae.cfg.k == 4
    manifest = json.loads((out / "saes" / "manifest.json").read_text())
    assert manifest["progress"]["l1"] == 0.0
    l0 = [r["value"] for r in figure_rows(out) if r["table"] == "table6" and r["metric"].endswith("l0")]
    assert not (out / "saes" / "sweep.json").exists() and "Not run" in (out / "report" / "report.md").read_text()
    assert all(v <= 4 + 1e-6 for v in l0)
