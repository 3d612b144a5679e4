"""Extraction and SAE training of `lgeo run` on 1 vs 8 simulated CPU devices: a correctness-at-scale check, not
a speed claim (simulated devices share the same cores).

Each layout runs `configs/micro.yaml` end to end in its own subprocess (its own XLA_FLAGS); the table gives the
corpus and saes stages' wall seconds (from the run's summary) and how far the corpus is from the one-device
corpus (max |difference| / the array's RMS, over every array). Two processes are not measured: stage runs over
several processes are refused for now (README, "Mesh and multi-host"). No GPU row: none on the machine this
was written on.

    python scripts/bench_scale.py                       # writes bench/scale.md (the package installed, or
    python scripts/bench_scale.py --out /tmp/scale.md   # PYTHONPATH=. from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchlib import load_average, write_markdown

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = (("1 device", 1, None), ("8 devices, data=8", 8, "data=8"), ("8 devices, fsdp=4 x model=2", 8,
           "fsdp=4,model=2"), ("8 devices, data=2 x fsdp=2 x model=2", 8, "data=2,fsdp=2,model=2"))


def run(out: Path, devices: int, mesh: str | None) -> dict[str, float]:
    """Stage -> seconds of one `lgeo run` on `devices` simulated CPU devices."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [sys.executable, "-m", "lgeo_jax.cli", "run", str(REPO / "configs" / "micro.yaml"), "--out", str(out)]
    proc = subprocess.run([*args, *(["--mesh", mesh] if mesh else [])], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"lgeo run failed ({mesh or 'one device'}):\n{proc.stderr[-3000:]}")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+done\s+([\d.]+) s", proc.stdout, re.M)}


def corpus_distance(a: Path, b: Path) -> float:
    """Max over every corpus array of max |a - b| / RMS(a)."""
    from lgeo_jax.corpus import open_corpus

    ca, cb = (open_corpus(json.loads((r / "corpus" / "stats.json").read_text())["store"]) for r in (a, b))
    worst = 0.0
    for split in ca.layout.split_rows:
        for name in ca.layout.names:
            for layer in ca.layout.layers:
                x, y = ca.split_rows(split, name, layer), cb.split_rows(split, name, layer)
                worst = max(worst, float(np.max(np.abs(x - y)) / np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/scale.md")
    args = parser.parse_args()
    before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for label, devices, mesh in LAYOUTS:
            out = Path(tmp) / label.replace(" ", "_").replace(",", "").replace("=", "")
            seconds = run(out, devices, mesh)
            reference = reference or out
            corpus, saes = seconds.get("corpus", float("nan")), seconds.get("saes", float("nan"))
            rows.append(f"| {label} | {corpus:.1f} | {saes:.1f} | {corpus_distance(reference, out):.1e} |")
    after = load_average()
    write_markdown(args.out, "Scale: 1 vs 8 simulated devices (correctness at scale, not speed)", [
        f"Load average before / after: {before} / {after}. Simulated CPU devices share the same cores, so the "
        "seconds say nothing about speed-up; the last column is the check.",
        "", "`python scripts/bench_scale.py` (configs/micro.yaml end to end per layout).", "",
        "| layout | corpus s | saes s | corpus max abs diff / RMS vs 1 device |", "|---|---|---|---|", *rows, "",
        "Two processes: not measured (multi-process stage runs are refused for now). GPU: no GPU on this machine; "
        "run this script on one for that row."])


if __name__ == "__main__":
    main()
