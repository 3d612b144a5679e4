"""Shared helpers for the benchmark scripts: timing, a mid-size random Gemma-2, markdown output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


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


def interleaved_times(fns: dict[str, Callable[[], object]], *, repeats: int = 5) -> dict[str, float]:
    """Median wall time per function, running them in turns (a, b, a, b, ...) after one warm-up each, so
    background load on a shared machine affects every contender alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    import jax
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
            f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")


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
