"""Helpers for end-to-end tests: run `lgeo` as a real subprocess and read what a run wrote."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
# Tables a complete micro report must contain (Table 12 comes from micro's small L1 sweep).
TABLES = ("table4", "table5", "table6", "table7", "table8", "table9", "table10", "table11", "table12",
          "crosscoder", "splice")  # micro's crosscoders and splice evaluation are on (a few seconds each)
# Headline numbers that must carry `.ci_low` / `.ci_high` rows in every (adapter, layer) cell, and those of
# Tables 9-11 that must carry a verdict `.vs_null` (issue 15's acceptance).
HEADLINES = (("table4", "mean_norm"), ("table5", "difference.rel_l2"), ("table5", "direct.rel_l2"),
             ("table5", "zero_input.rel_l2"), ("table5", "mean_delta.rel_l2"), ("table6", "0.rel_l2"),
             ("table7", "difference.rel_l2"), ("table8", "all.overlap"), ("table9", "delta_vs_dictionary.mean"),
             ("table10", "delta_vs_dictionary.mean"), ("table11", "delta_base"), ("table11", "base_adapted"),
             ("table11", "null_base_adapted"), ("table11", "variance_ratio"))
VERDICTS = (("table9", "delta_vs_dictionary.mean"), ("table9", "delta_vs_dictionary.mnn"),
            ("table10", "delta_vs_dictionary.mean"), ("table11", "delta_base"), ("table11", "base_adapted"))
SPLICE_METRICS = ("kl_base_only", "kl_delta_sae", "kl_dictionary_difference", "kl_random_sae",
                  "effect_recovered.delta_sae", "effect_recovered.dictionary_difference",
                  "effect_recovered.random_sae", "ce.adapted", "ce.base", "ce.delta_sae")  # issue 16's rows
_INTERVAL = re.compile(r"\d \[-?\d[\d.]*, -?\d[\d.]*\]")  # "0.123 [0.110, 0.131]"


def lgeo(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)  # the CLI runs on one CPU device, as a user's would
    return subprocess.run([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def figure_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "report" / "figures.json").read_text())["rows"]


def check_report(run_dir: Path) -> None:
    """Every table present, every value finite and within its valid range; every headline number of Tables 4-11 with
    its interval in figures.json and report.md, and the verdicts of Tables 9-11."""
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
        if m.endswith((".vs_null", ".vs_random")):
            if v not in (-1, 0, 1):
                raise AssertionError(f"verdict not in -1 / 0 / 1 {r}")
            continue
        if m.startswith("variance_ratio"):
            if v < 0:
                raise AssertionError(f"negative variance ratio {r}")
            continue
        if "pct" in m and not 0 <= v <= 100:
            raise AssertionError(f"percentage out of range {r}")
        if r["table"] == "table11" and not -1e-6 <= v <= 1 + 1e-6:
            raise AssertionError(f"CKA out of range {r}")
        if r["table"] == "table10" and m.endswith((".mean", ".min")) and not 0 <= v <= 90:
            raise AssertionError(f"angle out of range {r}")
    keys = {(r["table"], r["adapter"], r["layer"], r["metric"]) for r in rows}
    cells = {(r["adapter"], r["layer"]) for r in rows if r["table"] == "table9"}
    for table, metric in HEADLINES:
        for adapter, layer in cells:
            for suffix in ("", ".ci_low", ".ci_high"):
                if (table, adapter, layer, metric + suffix) not in keys:
                    raise AssertionError(f"figures.json has no {table} {metric}{suffix} for {adapter} L{layer}")
    for table, metric in VERDICTS:
        for adapter, layer in cells:
            if (table, adapter, layer, f"{metric}.vs_null") not in keys:
                raise AssertionError(f"figures.json has no verdict {table} {metric}.vs_null for {adapter} L{layer}")
    report = (run_dir / "report" / "report.md").read_text()
    sections = re.split(r"\n## ", report)
    for n in range(4, 13):
        section = next((s for s in sections if s.startswith(f"Table {n}:")), None)
        if section is None:
            raise AssertionError(f"report.md has no Table {n} section")
        if 4 <= n <= 11 and not _INTERVAL.search(section):
            raise AssertionError(f"report.md's Table {n} shows no interval")
        if 9 <= n <= 11 and not any(mark in section for mark in "▲▼≈"):
            raise AssertionError(f"report.md's Table {n} shows no verdict")
    crosscoders = {(r["adapter"], r["layer"]) for r in rows if r["table"] == "crosscoder"}
    nulls = {(r["adapter"], r["layer"]) for r in rows
             if r["table"] == "crosscoder" and r["metric"].endswith("random_init_classes.shared")}
    if crosscoders != nulls or "## Crosscoders between the base and adapted models" not in report:
        raise AssertionError("the crosscoder section or its random-init null is missing")
    splice_cells = {(r["adapter"], r["layer"]) for r in rows if r["table"] == "splice"}
    if splice_cells != cells or "## Splice evaluation" not in report:
        raise AssertionError(f"splice evaluation covers {sorted(splice_cells)}, not every cell {sorted(cells)}")
    for adapter, layer in cells:
        for metric in SPLICE_METRICS:
            for suffix in ("", ".ci_low", ".ci_high"):
                if ("splice", adapter, layer, metric + suffix) not in keys:
                    raise AssertionError(f"figures.json has no splice {metric}{suffix} for {adapter} L{layer}")
        if ("splice", adapter, layer, "effect_recovered.delta_sae.vs_random") not in keys:
            raise AssertionError(f"figures.json has no splice verdict for {adapter} L{layer}")
    if "## Training health of the SAEs" not in report:
        raise AssertionError("report.md does not open with the training-health section")
