"""`lgeo run configs/micro.yaml` on a device mesh gives what one device gives; `lgeo plan --mesh` per device.

The runs are subprocesses with their own XLA_FLAGS (this process has the conftest's 8 CPU devices). Tolerances
(float32 throughout micro; only the reduction order changes with the layout):
- corpus arrays: max |difference| <= 1e-3 x the array's RMS. The base residuals differ ~3e-6 (the same weights,
  other summation order); the adapter deltas ~6e-5 of their RMS, since 10 Adam steps on differently summed
  gradients leave the factors ~1e-5 apart. Metadata (sample ids, positions, tokens) must be identical.
- figures that do not depend on an SAE (Tables 2, 4, 5, 6, 7, 11): relative 1e-2 (floor 0.01), median 1e-4.
- SAE-derived figures: the SAEs train two epochs on those slightly different deltas, and counts (top-k
  overlaps, densities) move in steps of one feature, so relative 5e-2 (floor 0.01), median 1e-3. Measured for
  fsdp=4 x model=2: max 2.7e-2 (Table 8), median 0.
- the splice's `effect_recovered.*` (table `splice`): fractions of the adapter's effect, 1 - KL_x / KL_base,
  whose natural scale is 1, not their value (they cross 0): absolute 2e-2, median 1e-3. Micro's KL_base is small
  and its 16 prompts set the interval ends, so the SAEs' differences above are amplified: measured for
  data=2 x fsdp=2 x model=2: max 1.0e-2 absolute (`delta_sae_minus_random_sae.ci_low`); the KL and CE values
  themselves stay inside the SAE-derived rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from lgeo_jax.corpus import open_corpus
from lgeo_jax.lora import load_adapter
from lgeo_jax.lora import residuals as lora_residuals
from lgeo_jax.model import load_model
from lgeo_jax.stages import sae_mesh, stage_mesh
from lgeo_jax.study import load_config
from tests.e2e import MICRO, REPO, figure_rows

NO_SAE_TABLES = {"table2", "table4", "table5", "table6", "table7", "table11"}
PAPER = str(REPO / "configs" / "paper.yaml")


def _lgeo(*args: str, devices: int, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    proc = _lgeo("run", str(MICRO), "--out", str(out), devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend cpu, 1 x cpu (1 local), process 0 of 1, mesh data=1,fsdp=1,model=1" in proc.stdout
    return out


def _corpus(run: Path):
    return open_corpus(json.loads((run / "corpus" / "stats.json").read_text())["store"])


def assert_same_corpus(a: Path, b: Path, rms_tol: float = 1e-3) -> None:
    ca, cb = _corpus(a), _corpus(b)
    for part in ("names", "layers", "d_model", "split_rows"):  # not the identity: it hashes the (near-equal) inputs
        assert getattr(ca.layout, part) == getattr(cb.layout, part), part
    for split in ca.layout.split_rows:
        ma, mb = ca.meta(split), cb.meta(split)
        assert ma.keys() == mb.keys()
        for name in ma:
            np.testing.assert_array_equal(ma[name], mb[name], err_msg=f"{split}/{name}")
        for name in ca.layout.names:
            for layer in ca.layout.layers:
                x, y = ca.split_rows(split, name, layer), cb.split_rows(split, name, layer)
                err = float(np.max(np.abs(x - y)) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))
                assert err <= rms_tol, (split, name, layer, err)


def assert_same_figures(a: Path, b: Path) -> None:
    ra, rb = figure_rows(a), figure_rows(b)
    key = lambda r: tuple((k, str(v)) for k, v in sorted(r.items()) if k != "value")
    va, vb = {key(r): r["value"] for r in ra}, {key(r): r["value"] for r in rb}
    assert va.keys() == vb.keys()
    errors = defaultdict(list)
    for k, x in va.items():
        y = vb[k]
        assert (x is None) == (y is None), k
        if x is None:
            continue
        row = dict(k)
        if row["table"] == "splice" and row["metric"].startswith("effect_recovered."):
            errors["splice effect"].append(abs(x - y))
        else:
            errors["no SAE" if row["table"] in NO_SAE_TABLES else "SAE"].append(abs(x - y) / max(abs(x), 1e-2))
    for kind, (max_tol, median_tol) in (("no SAE", (1e-2, 1e-4)), ("SAE", (5e-2, 1e-3)),
                                        ("splice effect", (2e-2, 1e-3))):
        e = np.asarray(errors[kind])
        assert e.size and e.max() <= max_tol and np.median(e) <= median_tol, (kind, e.max(), np.median(e))


def _mesh_run(tmp_path: Path, one_device: Path, mesh: str) -> None:
    out = tmp_path / "run"
    proc = _lgeo("run", str(MICRO), "--out", str(out), "--mesh", mesh, devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = dict(item.split("=") for item in mesh.split(","))
    want = ",".join(f"{a}={sizes.get(a, str(8 // np.prod([int(v) for v in sizes.values()])))}"
                    for a in ("data", "fsdp", "model"))
    assert f"backend cpu, 8 x cpu (8 local), process 0 of 1, mesh {want}" in proc.stdout
    assert_same_corpus(one_device, out)
    assert_same_figures(one_device, out)


def test_micro_on_every_mesh_axis_matches_one_device(tmp_path, one_device):
    """The default-set variant: one layout that uses all three axes."""
    _mesh_run(tmp_path, one_device, "data=2,fsdp=2,model=2")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=8", "fsdp=4,model=2"])
def test_micro_on_a_mesh_matches_one_device(tmp_path, one_device, mesh):
    _mesh_run(tmp_path, one_device, mesh)


def test_the_stages_load_straight_into_the_configured_sharding(one_device):
    """What the adapters and corpus stages load (through `stage_mesh`) is laid out on the configured mesh:
    weights split over fsdp x model, LoRA factors by their axes, residual batches over data x fsdp; the SAE
    jobs get the configured mesh."""
    assert jax.device_count() == 8
    config = load_config(MICRO, [f"run_dir={one_device}", "mesh.data=2", "mesh.fsdp=2", "mesh.model=2"])
    base = one_device / "base" / "model"
    mesh = stage_mesh(config, base)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    model = load_model(base, mesh=mesh)
    embed = model.embed[...]  # [vocab, embed]
    assert isinstance(embed.sharding, NamedSharding) and embed.sharding.mesh == mesh
    assert tuple(embed.sharding.spec) == ("model", "fsdp")
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape == (
        embed.shape[0] // 2, embed.shape[1] // 2)
    adapter = load_adapter(one_device / "adapters" / "r2", config=model.config, mesh=mesh)
    a = adapter.q.a.get_value()
    assert a.sharding.mesh == mesh and "fsdp" in jax.tree.leaves(tuple(a.sharding.spec))
    tokens = np.ones((8, 16), np.int32)  # [B, T]
    res = lora_residuals(model, tokens, layers=[0], adapters=adapter)  # [A, C, B, T, D]
    assert tuple(res.sharding.spec)[2] == ("data", "fsdp")
    assert dict(sae_mesh(config).shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert sae_mesh(load_config(MICRO)) is None  # all auto: the SAE trainer's own layout


def test_plan_prints_per_device_memory_and_refuses_what_does_not_fit():
    total = 9_241_705_984 * 2  # Gemma-2-9B parameters (Table 2's count) in bfloat16
    proc = _lgeo("plan", PAPER, "--mesh", "fsdp=8", devices=1)
    assert f"weights {total / 8 / 2**30:,.2f} GiB" in proc.stdout, proc.stdout
    assert "Per device on the mesh data=1,fsdp=8,model=1 (8 device(s)" in proc.stdout
    # 60 SAEs of width 16,384 in one job: replicated over fsdp they need far more than 16 GiB per device
    assert proc.returncode == 2 and "stage saes needs at least" in proc.stderr and "16.00 GiB" in proc.stderr
    assert "the mesh data=1,fsdp=1,model=8 would fit" in proc.stderr
    proc = _lgeo("plan", PAPER, "--mesh", "data=1", devices=1)
    assert f"weights {total / 2**30:,.2f} GiB" in proc.stdout and proc.returncode == 2
    # the mesh the refusal names does fit
    proc = _lgeo("plan", PAPER, "--mesh", "model=8", devices=1)
    assert proc.returncode == 0, proc.stderr
    assert f"weights {total / 8 / 2**30:,.2f} GiB" in proc.stdout


def test_bad_mesh_and_distributed_flags_are_clear_errors(tmp_path):
    proc = _lgeo("plan", str(MICRO), "--mesh", "tensor=2", devices=1)
    assert proc.returncode == 2 and "AXIS one of data, fsdp, model" in proc.stderr
    proc = _lgeo("run", str(MICRO), "--out", str(tmp_path / "r"), "--coordinator", "127.0.0.1:1", devices=1)
    assert proc.returncode == 2 and "go together; set all three" in proc.stderr
    assert not (tmp_path / "r").exists()
