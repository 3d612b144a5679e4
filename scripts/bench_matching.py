"""Benchmark `hungarian_match` (JAX float32 cosines + scipy assignment) against numpy float64 cosines + scipy.

Both sides hand their cost matrix to the same `scipy.optimize.linear_sum_assignment(maximize=True)`, so
the comparison is the cost-matrix build (JAX: chunked float32 on the device, assembled on the host;
numpy: one float64 matmul) plus whatever the float32 rounding does to the assignment's running time and
result. Inputs: random float32 rows (the null case; real decoders with many near-copies are easier for
the solver). JAX times exclude compilation (a warm-up call first). Peak extra memory is the process's
high-water RSS during the stage (reset through /proc/self/clear_refs) minus RSS before it.

Paper shape, 16,384 x 16,384 x 3,584: expect 3-4 minutes on 2 quiet cores (three assignments of ~40 s
each, extrapolated from 1.3 s at 4,000 and 6.5 s at 8,000 rows). Unset the machine's OpenBLAS overrides
for a fair numpy baseline (ENV_NOTES):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_matching.py   # writes bench/matching.md
    python scripts/bench_matching.py --quick                                        # 1,024 x 1,024 x 256, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import scipy.optimize

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import write_markdown

from lgeo_jax import geometry as geo
from lgeo_jax.geometry._matching import _cosine_matrix


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


class _Stage:
    """Wall and process-CPU seconds and peak extra RSS of one `with` block."""

    def __enter__(self) -> _Stage:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.rss0, self.cpu0, self.t0 = _rss_gb(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        self.peak_gb = _peak_gb() - self.rss0


def _ours(a: jax.Array, b: jax.Array, chunk: int) -> dict:
    a_unit, b_unit = (jax.block_until_ready(geo.normalize_rows(x)[0]) for x in (a, b))
    _cosine_matrix(a_unit, b_unit, chunk, False)  # warm-up: compiles the block kernel for these shapes
    with _Stage() as build:
        cost = _cosine_matrix(a_unit, b_unit, chunk, False)  # [M, N] float32, as hungarian_match builds it
    with _Stage() as solve:
        rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=True)
    total32 = float(cost[rows, cols].sum(dtype=np.float64))
    del cost
    with _Stage() as public:  # the public function end to end: normalise, build, solve, gather
        rows_p, cols_p, _ = geo.hungarian_match(a, b, chunk=chunk)
    if not (np.array_equal(rows_p, rows) and np.array_equal(cols_p, cols)):
        raise RuntimeError("hungarian_match disagrees with its own stages")
    return {"build": build, "solve": solve, "end_to_end": public, "rows": rows, "cols": cols, "total": total32}


def _reference(a: np.ndarray, b: np.ndarray) -> dict:
    with _Stage() as build:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        a64 /= np.linalg.norm(a64, axis=1, keepdims=True)
        b64 /= np.linalg.norm(b64, axis=1, keepdims=True)
        cost = a64 @ b64.T  # [M, N] float64
        del a64, b64
    with _Stage() as solve:
        rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=True)
    total = float(cost[rows, cols].sum())
    return {"build": build, "solve": solve, "rows": rows, "cols": cols, "total": total, "cost": cost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=16_384, help="rows of a (latents of the first dictionary)")
    parser.add_argument("--n", type=int, default=16_384, help="rows of b")
    parser.add_argument("--d", type=int, default=3584, help="feature dim (Gemma-2-9B d_model)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="1,024 x 1,024 x 256 smoke run; writes no file")
    parser.add_argument("--out", default=None, help="markdown output (default bench/matching.md; none with --quick)")
    args = parser.parse_args()
    m, n, d = (1024, 1024, 256) if args.quick else (args.m, args.n, args.d)
    out = args.out or (None if args.quick else "bench/matching.md")
    load_before = os.getloadavg()[0]

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, d), dtype=np.float32)  # [M, D]
    b = rng.standard_normal((n, d), dtype=np.float32)  # [N, D]
    ours = _ours(jax.device_put(a), jax.device_put(b), args.chunk)
    ref = _reference(a, b)
    ours_total64 = float(ref["cost"][ours["rows"], ours["cols"]].sum())  # our pairs scored in float64
    same = float(np.mean(np.isin(ours["rows"] * n + ours["cols"], ref["rows"] * n + ref["cols"])))
    load = max(load_before, os.getloadavg()[0])

    def row(name: str, stage: _Stage, what: str) -> str:
        return f"| {name} | {what} | {stage.wall:.2f} | {stage.cpu:.2f} | {stage.peak_gb:.2f} |"

    lines = [
        f"Shape: a [{m}, {d}], b [{n}, {d}] random float32 rows; chunk {args.chunk}; load {load:.1f} "
        "(1-minute average, max of start and end; wall times are inflated when > 2).",
        f"Command: `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python {' '.join(sys.argv)}`.",
        "",
        "| stage | what | wall s | CPU s | peak extra GiB |",
        "|---|---|---:|---:|---:|",
        row("ours/build", ours["build"], "JAX float32 cosines, chunked on the device, to a host array"),
        row("ours/solve", ours["solve"], "scipy linear_sum_assignment on the float32 costs"),
        row("ours/hungarian_match", ours["end_to_end"], "the public function end to end"),
        row("numpy/build", ref["build"], "numpy float64 normalise + matmul"),
        row("numpy/solve", ref["solve"], "scipy linear_sum_assignment on the float64 costs"),
        "",
        f"Totals: ours {ours['total']:.6f} (float32 costs), numpy {ref['total']:.6f} (float64 optimum); mean "
        f"matched cosine {ref['total'] / min(m, n):.6f}.",
        f"Our pairs re-scored in float64: {ours_total64:.6f} ({ours_total64 - ref['total']:+.2e} vs the optimum); "
        f"pairs identical to numpy's: {same:.4%}.",
    ]
    print("\n".join(lines), flush=True)
    if out:
        write_markdown(out, "Hungarian matching benchmark", lines)


if __name__ == "__main__":
    main()
