"""The saes stage through `lgeo run` (reusing the session's micro run): `saes/health.json` for every SAE, and an
L1 sweep that cannot reach `sae.l0_target` failing with what it found (or, with `sae.allow_off_target`, a
warning in health.json and the log)."""

import json
import shutil

import numpy as np
import pytest
from e2e import MICRO, lgeo

from lgeo_jax.sae import MOVED_COS, initial_decoder, load_sae, read_metrics
from lgeo_jax.study import load_config


def rerun(micro_run, tmp_path, *settings: str):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    return out, lgeo("run", str(MICRO), "--out", str(out), *[a for s in settings for a in ("--set", s)])


def test_health_json_covers_every_sae(micro_run):
    config = load_config(MICRO)
    health = json.loads((micro_run / "saes" / "health.json").read_text())
    assert set(health) == {"d_in", "l0_target", "dead_window_tokens", "saes", "warnings"}
    assert health["d_in"] == config.model.builtin.d_model and health["l0_target"] == list(config.sae.l0_target)
    job = micro_run / "saes" / "job"
    assert sorted(h["name"] for h in health["saes"]) == sorted(p.name for p in (job / "saes").iterdir())
    assert {h["adapter"] for h in health["saes"]} == {*config.lora.names, "base"}
    last = {r["name"]: r for r in read_metrics(job / "metrics.csv") if r["step"] == max(
        r["step"] for r in read_metrics(job / "metrics.csv"))}
    total = int(next(iter(last.values()))["step"])
    assert health["dead_window_tokens"] == round(config.sae.dead_window_fraction * total) * config.sae.batch_size
    lo, hi = config.sae.l0_target
    for h in health["saes"]:
        assert set(h) == {"name", "adapter", "layer", "seed", "l0", "dead_fraction", "cos_to_init_median",
                          "moved_fraction", "heldout_fvu", "healthy", "problems"}
        sae_dir = job / "saes" / h["name"]
        sae = load_sae(sae_dir)
        init_seed = json.loads((sae_dir / "cfg.json").read_text())["seed"]
        w, w0 = sae.params["W_dec"].astype(np.float64), initial_decoder(sae.cfg, init_seed).astype(np.float64)
        cos = np.sum(w * w0, 1) / np.linalg.norm(w, axis=1) / np.linalg.norm(w0, axis=1)
        assert h["cos_to_init_median"] == pytest.approx(np.median(cos), abs=1e-6)
        assert h["moved_fraction"] == pytest.approx(np.mean(cos < MOVED_COS))
        assert h["l0"] == last[h["name"]]["heldout_l0"] and h["heldout_fvu"] == last[h["name"]]["heldout_fvu"]
        assert h["dead_fraction"] == last[h["name"]]["dead_frac"]
        ok = lo <= h["l0"] <= hi and h["l0"] < health["d_in"] and h["moved_fraction"] >= 0.5
        assert h["healthy"] == int(ok) and (h["problems"] == []) == ok


def test_sweep_off_target_fails_naming_its_l0s_or_warns_when_allowed(micro_run, tmp_path):
    grid = ["sae.l1_sweep=[30.0,60.0]", "sae.l1_sweep_rounds=0"]  # micro's L0 at these is far below [4, 16]
    out, proc = rerun(micro_run, tmp_path, *grid, "sae.allow_off_target=false")
    assert proc.returncode != 0
    err = proc.stderr
    assert "no L1 coefficient gave a held-out L0 inside sae.l0_target [4, 16] after 1 sweep round(s)" in err, err
    assert "L1 30 -> L0" in err and "L1 60 -> L0" in err and "try sae.l1_sweep: [" in err

    shutil.rmtree(out)
    out, proc = rerun(micro_run, tmp_path, *grid, "sae.allow_off_target=true")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    warnings = json.loads((out / "saes" / "health.json").read_text())["warnings"]
    assert len(warnings) == 1 and "off target (sae.allow_off_target)" in warnings[0] and "L1 30 -> L0" in warnings[0]
    assert warnings[0] in (out / "lgeo.log").read_text()
    sweep = json.loads((out / "saes" / "sweep.json").read_text())
    assert not sweep["on_target"] and sweep["used_l1"] == 30.0  # the nearest (the denser one)
