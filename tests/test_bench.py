"""scripts/bench.py: a --quick run writes the one table with every stage, both sides and every agreement check;
numpy baselines run without the machine's OpenBLAS slow-down variables; a wrong reference output fails its check."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STAGES = {"extract", "lora_train", "corpus_write", "corpus_read", "sae_train", "sae_train_bf16", "sae_train_saelens",
          "max_cosine", "max_cosine_torch", "principal_angles", "principal_angles_torch", "linear_cka",
          "linear_cka_torch"}
WITH_FLOPS = {"extract", "lora_train", "sae_train", "sae_train_bf16", "sae_train_saelens", "max_cosine",
              "max_cosine_torch", "principal_angles", "principal_angles_torch", "linear_cka", "linear_cka_torch"}


def _env():
    """The bench's own environment: one CPU device (not the tests' 8) and the slow-BLAS variables set, as on
    this machine, so the run shows that its numpy worker drops them."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join([str(REPO), str(SCRIPTS)])  # this checkout's lgeo_jax, whatever else is installed
    return {**env, "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512", "PYTHONPATH": path}


def test_quick_run_writes_every_stage_with_agreement(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--profile", "cpu", "--quick", "--out",
                           str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())

    assert [r["stage"] for r in result["stages"]] and {r["stage"] for r in result["stages"]} == STAGES
    for r in result["stages"]:
        assert {"stage", "jax", "torch", "unit", "ratio", "agree"} <= set(r)
        assert r["jax"] > 0 and r["torch"] > 0 and math.isclose(r["ratio"], r["jax"] / r["torch"], rel_tol=1e-9)
        assert r["jax_seconds"] and r["torch_seconds"]
        checks = r["agree"]["checks"]
        assert checks and r["agree"]["ok"] is True, (r["stage"], checks)
        for c in checks:  # every check computed: a finite discrepancy within its stated tolerance
            assert math.isfinite(c["value"]) and c["value"] >= 0 and c["tol"] >= 0 and c["ok"] is True, c
        if r["stage"] in WITH_FLOPS:
            assert r["jax_gflops"] > 0 and r["torch_gflops"] > 0 and r["jax_pct_ceiling"] > 0
    assert len(result["load_average"]) == 3 and isinstance(result["quiet"], bool)
    assert pathlib.Path(result["lgeo_jax"]) == REPO / "lgeo_jax"
    assert result["machine"] and all(result["matmul_ceiling_gflops"][k] > 0 for k in ("jax", "torch", "numpy"))
    assert result["openblas_env"] == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512"}
    assert result["numpy_blas_env"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}

    table = (tmp_path / "results.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in table
    assert "numbers meaningless" in table  # a quick run says it is one


def test_a_wrong_reference_output_fails_its_agreement_check(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchlib import NumpyWorker

    import bench

    true_max_cosine = bench.ref_geometry.max_cosine

    def off_by_a_little(a, b, **kw):
        best, idx = true_max_cosine(a, b, **kw)
        return best + 1e-4, idx  # far below anything a table would show, far above float32 rounding

    monkeypatch.setattr(bench.ref_geometry, "max_cosine", off_by_a_little)
    profile = bench.dataclasses.replace(bench.PROFILES["cpu"], **bench.QUICK)
    with NumpyWorker(str(tmp_path)) as worker:
        numpy_row, torch_row = bench.stage_max_cosine(bench.Context(profile, tmp_path, worker, quick=True))
    assert numpy_row["agree"]["ok"] is True
    assert torch_row["agree"]["ok"] is False
    assert not torch_row["agree"]["checks"][0]["ok"] and np.isclose(torch_row["agree"]["checks"][0]["value"], 1e-4,
                                                                     rtol=0.05)
