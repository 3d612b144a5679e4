"""Helpers for end-to-end tests: run `lgeo` as a real subprocess and read what a run wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
# Tables a complete micro report must contain (Table 12 comes from micro's small L1 sweep).
TABLES = ("table4", "table5", "table6", "table7", "table8", "table9", "table10", "table11", "table12")


def lgeo(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)  # the CLI runs on one CPU device, as a user's would
    return subprocess.run([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def figure_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "report" / "figures.json").read_text())["rows"]


def check_report(run_dir: Path) -> None:
    """Every table present, every value finite and within its valid range."""
    rows = figure_rows(run_dir)
    present = {r["table"] for r in rows}
    missing = [t for t in TABLES if t not in present]
    if missing:
        raise AssertionError(f"report misses {missing}")
    for r in rows:
        v, m = r["value"], r["metric"]
        if v is None:
            continue
        if not math.isfinite(v):
            raise AssertionError(f"non-finite {r}")
        if "pct" in m and not 0 <= v <= 100:
            raise AssertionError(f"percentage out of range {r}")
        if r["table"] == "table11" and not -1e-6 <= v <= 1 + 1e-6:
            raise AssertionError(f"CKA out of range {r}")
        if r["table"] == "table10" and m.endswith((".mean", ".min")) and not 0 <= v <= 90:
            raise AssertionError(f"angle out of range {r}")
    report = (run_dir / "report" / "report.md").read_text()
    for n in range(4, 13):
        if f"## Table {n}" not in report:
            raise AssertionError(f"report.md has no Table {n} section")
