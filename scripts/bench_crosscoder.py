"""Benchmark: crosscoder training throughput, C crosscoders in one vmapped jitted step (lgeo_jax.crosscoder)
against a straightforward PyTorch trainer run once per crosscoder (scripts/reference_torch/crosscoder.py, one
at a time as the diffing toolkit does), on the same (h_base, h_adapted) data, BatchTopK with AuxK.

Throughput is in crosscoder-tokens/s (tokens x crosscoders trained per second, compile excluded). Before
timing, both sides train the first crosscoder from identical weights for `--check-steps` steps on the same
batches and their parameters are compared (agreement). Writes bench/crosscoder.md (or --out).

    python scripts/bench_crosscoder.py --d-in 512 --width 4096 --n-cc 8 --batch 1024 --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import load_average, write_markdown
from reference_torch.crosscoder import train_crosscoder

from lgeo_jax.crosscoder import CrosscoderConfig, init_params
from lgeo_jax.crosscoder._models import CrossState
from lgeo_jax.crosscoder._train import _compiled
from lgeo_jax.sae import default_mesh


def data(n_cc: int, rows: int, d: int, seed: int = 0) -> np.ndarray:
    """[C, N, 2D]: a shared base stream and per-crosscoder deltas (a low-rank shift plus noise)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(rows, d)).astype(np.float32)
    out = []
    for _ in range(n_cc):
        shift = rng.normal(size=(rows, 4)) @ rng.normal(size=(4, d)) * 0.3 + 0.05 * rng.normal(size=(rows, d))
        out.append(np.concatenate([base, base + shift.astype(np.float32)], axis=1))
    return np.stack(out)


def jax_run(x: np.ndarray, cfg: CrosscoderConfig, params0: dict, scale: np.ndarray, steps: int):
    """C crosscoders stepped together `steps` times on contiguous batches; returns (params, seconds)."""
    n, rows, e = x.shape
    optimizer, _, state_sh, step_fn, _ = _compiled(cfg, default_mesh(n), n, e)
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    state = jax.device_put(CrossState(params, jax.vmap(optimizer.init)(params), jnp.zeros((n, cfg.width), jnp.int32),
                                      jnp.asarray(scale)), state_sh)
    per = rows // cfg.batch_size
    batches = [jnp.asarray(x[:, i * cfg.batch_size:(i + 1) * cfg.batch_size]) for i in range(min(per, steps))]
    state, m = step_fn(state, batches[0])  # compile (and step 0)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for step in range(1, steps):
        state, m = step_fn(state, batches[step % len(batches)])
    jax.block_until_ready(state.params)
    return jax.device_get(state.params), (time.perf_counter() - t0) * steps / max(steps - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-cc", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--check-steps", type=int, default=5)
    ap.add_argument("--out", default="bench/crosscoder.md")
    args = ap.parse_args()
    load0 = load_average()
    rows = args.batch * max(args.steps, args.check_steps)
    x = data(args.n_cc, rows, args.d_in)
    cfg = CrosscoderConfig(width=args.width, k=args.k, lr=1e-3, batch_size=args.batch, steps=10 * args.steps)
    keys = jnp.stack([jax.random.key(i) for i in range(args.n_cc)])
    params0 = jax.device_get(jax.vmap(lambda key: init_params(key, args.d_in, cfg))(keys))
    scale = np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, -1), -1) / (2 * args.d_in)).astype(np.float32)
    params0["b_dec"] = (x.mean(axis=1) / scale[:, None]).astype(np.float32)
    torch_kw = dict(k=args.k, batch_size=args.batch, lr=cfg.lr, auxk_coeff=cfg.auxk_coeff,
                    threshold_lr=cfg.threshold_lr, dead_steps=cfg.dead_window_steps())

    # agreement: crosscoder 0, identical start and batches
    ours, _ = jax_run(x[:1], cfg, {k: v[:1] for k, v in params0.items()}, scale[:1], args.check_steps)
    ref, _ = train_crosscoder(x[0], {k: np.asarray(v[0]) for k, v in params0.items()}, float(scale[0]),
                              steps=args.check_steps, **torch_kw)
    diff = max(float(np.max(np.abs(ours[k][0] - ref[k])) / (np.max(np.abs(ref[k])) + 1e-12)) for k in ref)

    _, jax_s = jax_run(x, cfg, params0, scale, args.steps)
    torch_s = 0.0
    for c in range(args.n_cc):
        _, s = train_crosscoder(x[c], {k: np.asarray(v[c]) for k, v in params0.items()}, float(scale[c]),
                                steps=args.steps, **torch_kw)
        torch_s += s
    toks = args.n_cc * args.steps * args.batch
    load1 = load_average()
    lines = [f"Command: `python scripts/bench_crosscoder.py --d-in {args.d_in} --width {args.width} --k {args.k} "
             f"--n-cc {args.n_cc} --batch {args.batch} --steps {args.steps}`.",
             f"Load average before / after: {load0} / {load1}"
             + (" — **measured under load**: numbers are smoke tests, not quiet-machine results." if max(load0) > 0.5
                else "."), "",
             "| trainer | crosscoder-tokens/s | seconds |", "|---|---|---|",
             f"| lgeo_jax, {args.n_cc} vmapped in one step | {toks / jax_s:,.0f} | {jax_s:.2f} |",
             f"| PyTorch reference, one at a time | {toks / torch_s:,.0f} | {torch_s:.2f} |", "",
             f"Speed-up: {torch_s / jax_s:.2f}x. Agreement after {args.check_steps} steps from identical weights "
             f"(max |Δ| / max |param|, worst parameter): {diff:.2e} (learning rate / max |param| = "
             f"{cfg.lr / max(float(np.max(np.abs(ref[k]))) for k in ref):.1e}: Adam's first steps are about ±lr "
             "wherever a gradient is non-zero, so a near-zero gradient whose float32 sign differs between the two "
             "moves that entry by ~lr; tests/test_crosscoder_reference.py holds the two to 2e-5 on a small problem).",
             "", "On a CPU both sides do the same work per crosscoder-step (the k·B selection over B·F entries and the "
             "matmuls), so vmapping several crosscoders into one step gains little there; its gain (one launch and "
             "one sharded step for all) is on accelerators and was not measured here.",
             "", "Real numbers: the same command on a quiet machine (load average below 0.5), or on a GPU/TPU host."]
    print("\n".join(lines))
    write_markdown(args.out, "Crosscoder training: vmapped JAX vs one-at-a-time PyTorch", lines)


if __name__ == "__main__":
    main()
