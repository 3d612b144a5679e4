"""SIGKILL `lgeo run` during each stage in turn (when its manifest shows progress, not on a timer), rerun,
and get the same results as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from e2e import MICRO, REPO, check_report, figure_rows, lgeo

from lgeo_jax.stages import STAGE_NAMES


def _shows_progress(run_dir, stage) -> bool:
    """The stage is running and has recorded progress or written output beyond its manifest."""
    manifest = run_dir / stage / "manifest.json"
    try:
        m = json.loads(manifest.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if m["status"] != "running":
        return False
    return bool(m.get("progress") or m.get("done")) or any(p.name != "manifest.json" for p in manifest.parent.iterdir())


def _run_until_progress(out, stage) -> bool:
    """Starts `lgeo run`; SIGKILLs it once `stage` shows progress. False if the run ended first."""
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "lgeo_jax.cli", "run", str(MICRO), "--out", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if _shows_progress(out, stage):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_in_every_stage_then_resume_matches_uninterrupted(micro_run, tmp_path):
    out = tmp_path / "killed"
    killed = [stage for stage in STAGE_NAMES if _run_until_progress(out, stage)]
    # Every stage that takes more than a moment must have been caught mid-way.
    assert {"base", "adapters", "corpus", "saes", "analysis"} <= set(killed), killed
    proc = lgeo("run", str(MICRO), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_report(out)
    ours, ref = figure_rows(out), figure_rows(micro_run)
    assert [(r["table"], r["adapter"], r["layer"], r["metric"]) for r in ours] == \
        [(r["table"], r["adapter"], r["layer"], r["metric"]) for r in ref]
    got = np.array([np.nan if r["value"] is None else r["value"] for r in ours], float)
    want = np.array([np.nan if r["value"] is None else r["value"] for r in ref], float)
    np.testing.assert_array_equal(got, want)
