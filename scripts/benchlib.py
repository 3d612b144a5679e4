"""Shared helpers for the benchmark scripts: timing in turns, matmul ceilings, FLOP counts, a numpy worker
process with the machine's BLAS slow-downs unset, a mid-size random Gemma-2, markdown output.

Run as ``python benchlib.py numpy-worker DIR`` it is that worker (see `NumpyWorker`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

# Set on this machine and slowing numpy's OpenBLAS (ENV_NOTES.md): unset for numpy baselines only.
SLOW_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def best_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall(fn: Callable[[], object]) -> Callable[[], float]:
    """`fn` as a function returning its wall seconds (fn must block until its work is done)."""

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def take_turns(fns: dict[str, Callable[[], float]], *, repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """Runs the contenders in turns (a, b, a, b, ...) after `warmup` rounds, so background load on a shared
    machine affects every contender alike. Each function returns the seconds it measured itself (its own
    steady-state timer, or `wall`); returns every timed round's seconds per contender."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(float(fn()))
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], *, repeats: int = 5) -> dict[str, float]:
    """Median wall time per function, timed in turns after one warm-up each (see `take_turns`)."""
    times = take_turns({name: wall(fn) for name, fn in fns.items()}, repeats=repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def machine() -> str:
    import jax
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    dev = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({dev.platform}: {dev.device_kind}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


# ---- matmul ceilings ---------------------------------------------------------------------------------

def _gflops(n: int, seconds: float) -> float:
    return 2 * n**3 / seconds / 1e9


def jax_matmul_gflops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Best of `reps` jitted n^3 matmuls on JAX's default device (float32 at HIGHEST precision, so an
    accelerator's TF32/bf16 passes do not inflate a float32 ceiling; bf16 accumulates in float32)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda u: jnp.matmul(u, u, precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    return max(_gflops(n, wall(lambda: mm(a).block_until_ready())()) for _ in range(reps))


def torch_matmul_gflops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best of `reps` float32 n^3 matmuls in torch (full float32: TF32 stays off, torch's default)."""
    import torch

    a = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once():
        a @ a
        sync()

    once()
    return max(_gflops(n, wall(once)()) for _ in range(reps))


# Dense peak FLOP/s of accelerators (vendor datasheets, SXM parts, no sparsity): float32 without tensor
# cores, and bf16 on tensor cores. MFU = achieved model FLOP/s / the peak of the dtype the work runs in.
DEVICE_PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "bfloat16": 989.0},
    "H100": {"float32": 67.0, "bfloat16": 989.0},
    "A100": {"float32": 19.5, "bfloat16": 312.0},
}


def device_peak_tflops(device_kind: str, dtype: str = "float32") -> float | None:
    """The datasheet peak for a JAX `device_kind` string ("NVIDIA H200", ...); None for CPUs and unknowns."""
    for name, peaks in DEVICE_PEAK_TFLOPS.items():
        if name in device_kind:
            return peaks[dtype]
    return None


# ---- FLOP counts -------------------------------------------------------------------------------------

def block_matmul_params(cfg) -> int:
    """Weights one token multiplies in one Gemma-2 block (q, k, v, o and the three MLP matrices)."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    return d * (n + 2 * k) * h + n * h * d + 3 * d * f


def forward_flops_per_token(cfg, seq: int, n_layers: int, *, lm_head: bool = False) -> int:
    """Matmul FLOPs of one token through `n_layers` blocks at sequence length `seq`: the projections plus
    QK^T and PV over the full T x S score matrix (both implementations compute it whole; the causal mask
    is applied after), plus the tied LM head when asked."""
    attn = 4 * seq * cfg.n_heads * cfg.head_dim
    head = 2 * cfg.vocab_size * cfg.d_model if lm_head else 0
    return n_layers * (2 * block_matmul_params(cfg) + attn) + head


def lora_flops_per_token(dims: dict[str, tuple[int, int]], rank: int, targets, n_layers: int) -> int:
    """FLOPs of one adapter's low-rank path per token: x A then (x A) B, 2 r (in + out) per target and layer."""
    return n_layers * sum(2 * rank * sum(dims[t]) for t in targets)


# ---- the numpy worker --------------------------------------------------------------------------------

def baseline_env() -> dict[str, str]:
    """This process's environment without the variables that slow numpy's OpenBLAS."""
    return {k: v for k, v in os.environ.items() if k not in SLOW_BLAS_VARS}


class NumpyWorker:
    """A child process that runs numpy / scipy baselines with `SLOW_BLAS_VARS` unset (read by OpenBLAS at
    load time, so they must be absent from the process's start), one call at a time.

    Arrays travel as .npy files in `workdir`; the worker keeps what it loaded, so repeated calls on the same
    inputs time the computation only. Calls are synchronous, so a baseline never overlaps JAX work in this
    process (a BLAS call beside in-flight XLA work can run 20x slower): block on JAX results first.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "numpy-worker", workdir],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=baseline_env(), text=True)
        self._count = 0

    def put(self, name: str, array) -> str:
        import numpy as np

        np.save(os.path.join(self.workdir, f"{name}.npy"), array)
        return name

    def call(self, fn: str, *args: str, **kwargs) -> tuple[float, list]:
        """Runs ``fn(*loaded args, **kwargs)`` there: (its wall seconds, its outputs as numpy arrays)."""
        import numpy as np

        self._count += 1
        request = {"fn": fn, "args": list(args), "kwargs": kwargs, "out": f"out{self._count}"}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"numpy worker died running {fn} (exit code {self._proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"numpy worker: {fn} failed: {reply['error']}")
        return reply["seconds"], [np.load(p) for p in reply["outputs"]]

    def env(self) -> dict[str, str | None]:
        """The slow-BLAS variables as the worker sees them (None = unset), for the record."""
        return json.loads(str(self.call("blas_env")[1][0]))

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()

    def __enter__(self) -> NumpyWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker_main(workdir: str) -> None:
    import numpy as np
    from reference_torch import numpy_geometry

    fns = {name: getattr(numpy_geometry, name)
           for name in ("max_cosine", "top_subspace", "principal_angles", "subspace_angles", "linear_cka")}
    fns["matmul"] = np.matmul
    fns["blas_env"] = lambda: np.array(json.dumps({k: os.environ.get(k) for k in SLOW_BLAS_VARS}))
    loaded: dict[str, np.ndarray] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            args = [loaded.setdefault(a, np.load(os.path.join(workdir, f"{a}.npy"))) for a in request["args"]]
            t0 = time.perf_counter()
            out = fns[request["fn"]](*args, **request["kwargs"])
            seconds = time.perf_counter() - t0
            outputs = []
            for i, value in enumerate(out if isinstance(out, tuple) else (out,)):
                path = os.path.join(workdir, f"{request['out']}_{i}.npy")
                np.save(path, np.asarray(value))
                outputs.append(path)
            reply = {"seconds": seconds, "outputs": outputs}
        except Exception as e:  # reported to the caller, which raises with the message
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


# ---- models and output -------------------------------------------------------------------------------

def mid_size_hf_config(layers: int = 8):
    """A mid-size Gemma-2 (d 512, 8 heads / 4 kv, head_dim 64, MLP 2048, window 128) for CPU benchmarks."""
    import transformers

    return transformers.Gemma2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=128,
        query_pre_attn_scalar=64, attn_implementation="eager")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_markdown(path: str, title: str, lines: list[str]) -> None:
    """Writes a benchmark result; relative paths are relative to the repository root, not the cwd."""
    path = os.path.join(REPO, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\nMachine: {machine()}.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["numpy-worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python benchlib.py numpy-worker DIR")
    _worker_main(sys.argv[2])
