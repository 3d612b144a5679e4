"""`lgeo run` end to end on the micro config, as CI's smoke run: tables complete and finite, exports load."""

import json

import numpy as np
from e2e import check_report, lgeo


def test_report_tables_complete_and_finite(micro_run):
    check_report(micro_run)
    assert (micro_run / "lgeo.log").read_text().count("stage report: done") == 1
    sweep = json.loads((micro_run / "saes" / "sweep.json").read_text())
    assert sweep["selected_l1"] in [p["l1_coeff"] for p in sweep["points"]]
    assert sweep["used_l1"] == sweep["selected_l1"]  # micro sets sae.l1: null, so the sweep chooses it


def test_rerun_skips_every_complete_stage(micro_run):
    proc = lgeo("run", "configs/micro.yaml", "--out", str(micro_run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("complete, skipped") == 9


def test_exported_sae_loads_in_saelens(micro_run, tmp_path):
    import torch
    from sae_lens import SAE as SaeLensSAE

    from lgeo_jax.sae import load_sae

    sae_dir = next((micro_run / "saes" / "job" / "saes").glob("r*_L*_s0"))
    proc = lgeo("export-sae", str(sae_dir), "--format", "saelens", "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = SaeLensSAE.load_from_disk(str(tmp_path / "export"), device="cpu")
    ours = load_sae(sae_dir)
    x = np.random.default_rng(0).normal(size=(64, ours.cfg.d_in)).astype(np.float32) * ours.scale
    with torch.no_grad():
        recon = theirs(torch.as_tensor(x)).numpy()
    want = np.asarray(ours.reconstruct(x))
    np.testing.assert_allclose(recon, want, rtol=0, atol=1e-5 * np.abs(want).max())
