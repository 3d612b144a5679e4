"""Benchmark the geometry kernels at paper shapes against plain numpy / torch / scipy implementations.

Each case runs in its own subprocess so its peak memory (getrusage max RSS, minus the RSS once the
inputs exist) is its own. JAX times exclude compilation, which is timed separately (AOT lower+compile).
Writes a markdown table to bench/geometry.md (or --out).

    python scripts/bench_geometry.py            # all cases, ~3-5 minutes on 2 CPU cores
    python scripts/bench_geometry.py --case max_cosine/jax   # one case, prints its JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import benchlib

M = N = 16_384  # latents per dictionary (width_16k)
D = 3584  # Gemma-2-9B d_model
K = 256  # Table 10 subspace dim
PAIRS = 8  # the paper has 24 (4 ranks x 6 layers); 8 keeps the scipy loop short
T_CKA = 4096  # tokens in the exact CKA case
STREAM_BATCHES, STREAM_ROWS = 8, 2048
SVD_SHAPE = (4096, 2048)  # the full SVD at paper shape takes ~3 minutes on 2 cores; compared smaller


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_CPU_SECONDS: list[float] = []  # process CPU time (all threads) of the last _timed call


def _timed(fn, *args):
    """Wall seconds; CPU seconds go to _CPU_SECONDS (robust to other jobs sharing the cores)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn(*args)
    _CPU_SECONDS[:] = [time.process_time() - cpu_start]
    return out, time.perf_counter() - start


def _jax_case(build):
    """build() -> (jitted fn, args, flops); compile and run seconds, XLA's temp memory, a checksum.

    Peak memory for JAX cases is XLA's own count of the kernel's scratch buffers (inputs and outputs
    excluded): RSS is useless there because the CPU allocator keeps freed input-generation buffers.
    """
    import jax

    fn, args, flops = build()
    jax.block_until_ready(args)
    compiled, compile_s = _timed(lambda: fn.lower(*args).compile())
    out, run_s = _timed(lambda: jax.block_until_ready(compiled(*args)))
    cpu_s = _CPU_SECONDS[0]
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return {
        "seconds": run_s,
        "cpu_s": cpu_s,
        "compile_s": compile_s,
        "flops": flops,
        "peak_extra_mb": temp_mb,
        "value": _summary(out),
    }


def _summary(out) -> float:
    import numpy as np

    leaves = out if isinstance(out, tuple) else (out,)
    return float(np.nanmean(np.abs(np.asarray(leaves[0], np.float64))))  # sign-free (subspace bases)


def case_max_cosine_jax():
    import jax

    from lgeo_jax import geometry as geo

    def build():
        a, b = map(jax.numpy.asarray, _normal(0, (M, D), (N, D)))
        return jax.jit(lambda a, b: geo.max_cosine(a, b, chunk=512)), (a, b), 2 * M * N * D

    return _jax_case(build)


def case_max_cosine_numpy():
    import numpy as np

    a, b = _normal(0, (M, D), (N, D))
    base = _rss_mb()

    def run():
        an = a / np.linalg.norm(a, axis=1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=1, keepdims=True)
        return (an @ bn.T).max(axis=1)  # the full [M, N] matrix: 1 GiB

    out, secs = _timed(run)
    return {"seconds": secs, "flops": 2 * M * N * D, "base_mb": base, "value": float(out.mean())}


def case_max_cosine_torch():
    import torch

    a, b = map(torch.from_numpy, _normal(0, (M, D), (N, D)))
    base = _rss_mb()

    def run():
        an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        return (an @ bn.T).max(dim=1).values

    out, secs = _timed(run)
    return {"seconds": secs, "flops": 2 * M * N * D, "base_mb": base, "value": float(out.mean())}


def _decoder(shape):
    import jax

    return jax.numpy.asarray(_normal(1, shape)[0])


def case_top_subspace_gram_jax():
    import jax

    from lgeo_jax import geometry as geo

    return _jax_case(
        lambda: (
            jax.jit(lambda w: geo.top_subspace(w, K, row_normalize=True, method="gram")),
            (_decoder((M, D)),),
            2 * M * D * D,
        )
    )


def case_top_subspace_gram_numpy():
    import numpy as np

    (w,) = _normal(1, (M, D))
    base = _rss_mb()

    def run():
        wn = w / np.linalg.norm(w, axis=1, keepdims=True)
        return np.linalg.eigh(wn.T @ wn)[1][:, ::-1][:, :K].T

    out, secs = _timed(run)
    return {"seconds": secs, "flops": 2 * M * D * D, "base_mb": base, "value": float(np.abs(out).mean())}


def case_top_subspace_subset_jax():
    import jax

    from lgeo_jax import geometry as geo

    return _jax_case(
        lambda: (
            jax.jit(lambda w: geo.top_subspace(w, K, row_normalize=True, method="subset")),
            (_decoder((M, D)),),
            2 * M * D * D,
        )
    )


def case_top_subspace_subset_scipy():
    import numpy as np
    import scipy.linalg

    (w,) = _normal(1, (M, D))
    base = _rss_mb()

    def run():
        wn = w / np.linalg.norm(w, axis=1, keepdims=True)
        return scipy.linalg.eigh(wn.T @ wn, subset_by_index=(D - K, D - 1), check_finite=False)[1][:, ::-1].T

    out, secs = _timed(run)
    return {"seconds": secs, "flops": 2 * M * D * D, "base_mb": base, "value": float(np.abs(out).mean())}


def case_top_subspace_svd_jax():
    import jax

    from lgeo_jax import geometry as geo

    return _jax_case(
        lambda: (
            jax.jit(lambda w: geo.top_subspace(w, K, row_normalize=True, method="svd")),
            (_decoder(SVD_SHAPE),),
            None,
        )
    )


def case_top_subspace_svd_numpy():
    import numpy as np

    (w,) = _normal(1, SVD_SHAPE)
    base = _rss_mb()

    def run():
        wn = w / np.linalg.norm(w, axis=1, keepdims=True)
        return np.linalg.svd(wn, full_matrices=False)[2][:K]

    out, secs = _timed(run)
    return {"seconds": secs, "flops": None, "base_mb": base, "value": float(np.abs(out).mean())}


def case_principal_angles_jax():
    import jax

    from lgeo_jax import geometry as geo

    def build():
        u, v = map(jax.numpy.asarray, _normal(2, (PAIRS, K, D), (PAIRS, K, D)))
        return jax.jit(geo.principal_angles), (u, v), None

    return _jax_case(build)


def case_principal_angles_scipy():
    import numpy as np
    import scipy.linalg

    u, v = (w.astype(np.float64) for w in _normal(2, (PAIRS, K, D), (PAIRS, K, D)))  # same inputs, float64
    base = _rss_mb()
    out, secs = _timed(lambda: [np.degrees(scipy.linalg.subspace_angles(u[i].T, v[i].T)) for i in range(PAIRS)])
    return {"seconds": secs, "flops": None, "base_mb": base, "value": float(np.mean(out))}


def _normal(seed: int, *shapes):
    """Float32 standard normals from numpy, so every implementation of a case sees the same inputs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, np.float32) for shape in shapes)


def _cka_inputs(seed: int, rows: int):
    """Correlated x, y [rows, D] with a residual-stream-like mean offset (300 x the spread)."""
    x, noise = _normal(seed, (rows, D), (rows, D))
    x += 300.0
    return x, x[:, ::-1] * 0.5 + noise


def case_linear_cka_jax():
    import jax

    from lgeo_jax import geometry as geo

    inputs = tuple(map(jax.numpy.asarray, _cka_inputs(3, T_CKA)))
    return _jax_case(lambda: (jax.jit(geo.linear_cka), inputs, 3 * 2 * T_CKA * D * D))


def case_linear_cka_numpy():
    import numpy as np

    x, y = (w.astype(np.float64) for w in _cka_inputs(3, T_CKA))  # float64 reference, same inputs
    base = _rss_mb()

    def run():
        xc, yc = x - x.mean(0), y - y.mean(0)
        return np.sum((yc.T @ xc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))

    out, secs = _timed(run)
    return {"seconds": secs, "flops": 3 * 2 * T_CKA * D * D, "base_mb": base, "value": float(out)}


def case_streaming_cka_jax():
    import jax

    from lgeo_jax import geometry as geo

    batches = [tuple(map(jax.numpy.asarray, _cka_inputs(10 + i, STREAM_ROWS))) for i in range(STREAM_BATCHES)]
    jax.block_until_ready(batches)
    base = _rss_mb()
    geo.StreamingCKA().update(*batches[0])  # compile once (same shapes for every batch)

    def run():
        acc = geo.StreamingCKA()
        for x, y in batches:
            acc.update(x, y)
        return acc.result()

    value, secs = _timed(run)
    return {
        "seconds": secs,
        "flops": 3 * 2 * STREAM_BATCHES * STREAM_ROWS * D * D,
        "base_mb": base,
        "value": value,
    }


CASES = {
    "max_cosine/jax": (case_max_cosine_jax, f"max_cosine {M}x{N}x{D}, chunk 512 (float32)"),
    "max_cosine/numpy": (case_max_cosine_numpy, "numpy float32, full cosine matrix then max"),
    "max_cosine/torch": (case_max_cosine_torch, "torch float32, full cosine matrix then max"),
    "top_subspace_gram/jax": (case_top_subspace_gram_jax, f"top_subspace {M}x{D}, k={K}, gram+eigh"),
    "top_subspace_gram/numpy": (case_top_subspace_gram_numpy, "numpy float32 gram + eigh"),
    "top_subspace_subset/jax": (case_top_subspace_subset_jax, f"top_subspace {M}x{D}, k={K}, gram + host subset eigh"),
    "top_subspace_subset/scipy": (case_top_subspace_subset_scipy, "numpy float32 gram + scipy subset eigh (evr)"),
    "top_subspace_svd/jax": (case_top_subspace_svd_jax, f"top_subspace {SVD_SHAPE[0]}x{SVD_SHAPE[1]}, svd"),
    "top_subspace_svd/numpy": (case_top_subspace_svd_numpy, "numpy float32 thin SVD"),
    "principal_angles/jax": (case_principal_angles_jax, f"{PAIRS} pairs of {K}-dim subspaces of R^{D}, vmapped"),
    "principal_angles/scipy": (case_principal_angles_scipy, "scipy.linalg.subspace_angles float64, loop"),
    "linear_cka/jax": (case_linear_cka_jax, f"linear_cka {T_CKA}x{D} vs {T_CKA}x{D} (float32)"),
    "linear_cka/numpy": (case_linear_cka_numpy, "numpy float64 centred products"),
    "streaming_cka/jax": (
        case_streaming_cka_jax,
        f"StreamingCKA {STREAM_BATCHES} x {STREAM_ROWS} rows, d={D} (f32 device + f64 merge)",
    ),
}


def _run_one(name: str) -> dict:
    load_before = os.getloadavg()[0]
    result = CASES[name][0]()
    result.setdefault("cpu_s", _CPU_SECONDS[0])
    if "base_mb" in result:  # numpy / torch / host-side cases: RSS growth over the inputs
        result["peak_extra_mb"] = _peak_mb() - result.pop("base_mb")
    result["load"] = max(load_before, os.getloadavg()[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process, print JSON")
    parser.add_argument("--out", default="bench/geometry.md")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_run_one(args.case)))
        return
    rows = []
    ceiling = benchlib.jax_matmul_gflops()
    for name in CASES:
        # numpy / scipy / torch cases start without this machine's BLAS slow-downs (benchlib.SLOW_BLAS_VARS)
        env = None if name.endswith("/jax") else benchlib.baseline_env()
        proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, check=False,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"bench case {name} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((name, res))
        print(
            f"{name:26s} {res['seconds']:8.2f} s wall {res['cpu_s']:8.2f} s CPU  peak +{res['peak_extra_mb']:7.0f} MB  "
            f"load {res['load']:.1f}  value {res['value']:.6g}",
            flush=True,
        )
    jax_res = {name.split("/")[0]: res for name, res in rows if name.endswith("/jax")}
    lines = [
        "Command: `python scripts/bench_geometry.py`. Times exclude JAX compilation (shown separately).",
        f"JAX float32 2048^3 matmul ceiling measured at the start: {ceiling:.0f} GFLOP/s. numpy / scipy / torch cases "
        f"run with {', '.join(benchlib.SLOW_BLAS_VARS)} unset (they slow OpenBLAS on this machine).",
        "Peak extra memory: JAX kernels = XLA temp buffers (compiled.memory_analysis(); inputs/outputs",
        "excluded); numpy/torch/streaming = max RSS of the case's own process minus its RSS with inputs.",
        "This 2-core machine is shared with other jobs: `load` is the 1-minute load average around the case;",
        "wall times are inflated and noisy whenever load > 2. CPU s (process CPU time, all threads) is far",
        "less sensitive to sharing, so the CPU-time ratio is the fairer comparison. Every implementation of",
        "a kernel gets the same float32 inputs (numpy RNG), so the `value` checksums should agree.",
        "GFLOP/s = matmul work / wall time.",
        "",
        "| case | what | wall s | CPU s | compile s | GFLOP/s | peak extra MB "
        "| ratio wall | ratio CPU | load | value |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in rows:
        ref = jax_res.get(name.split("/")[0])
        is_ref = ref is None or name.endswith("/jax")
        ratio_wall = "" if is_ref else f"{res['seconds'] / ref['seconds']:.2f}x"
        ratio_cpu = "" if is_ref else f"{res['cpu_s'] / ref['cpu_s']:.2f}x"
        gflops = f"{res['flops'] / res['seconds'] / 1e9:.0f}" if res.get("flops") else ""
        compile_s = f"{res['compile_s']:.2f}" if "compile_s" in res else ""
        lines.append(
            f"| {name} | {CASES[name][1]} | {res['seconds']:.2f} | {res['cpu_s']:.2f} | {compile_s} | {gflops} | "
            f"{res['peak_extra_mb']:.0f} | {ratio_wall} | {ratio_cpu} | {res['load']:.1f} | {res['value']:.6g} |"
        )
    lines += ["", "Ratios = that implementation's time / the JAX kernel's time (>1: JAX is faster)."]
    benchlib.write_markdown(args.out, "Geometry kernel benchmark", lines)


if __name__ == "__main__":
    main()
