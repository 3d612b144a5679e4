"""Lint is part of the test suite, so CI keeps the code base clean (ruff rules in pyproject.toml)."""

import subprocess
import sys

from e2e import REPO


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lgeo_jax", "tests", "scripts"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
