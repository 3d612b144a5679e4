"""Test setup: 8 simulated CPU devices (set before JAX initialises) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data` beside the checkout (real tokenizer + Alpaca subset); tests skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> pathlib.Path:
    """One uninterrupted `lgeo run configs/micro.yaml` (a real subprocess), shared by the end-to-end tests."""
    from e2e import MICRO, lgeo

    out = tmp_path_factory.mktemp("micro")
    proc = lgeo("run", str(MICRO), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
