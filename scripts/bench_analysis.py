"""Benchmark the analysis token pass (Tables 5, 6, 8, 11 for one adapter) against plain numpy doing the same.

The pass runs three dictionary forwards (delta, h_base, h_adapted), one delta-SAE forward, float64 error /
overlap sums and four streaming CKA accumulators per batch. The numpy reference does the same work with
float32 matmuls (MKL/OpenBLAS) and float64 sums, CKA from centred feature-space products. Scaled-down
shapes (d 1024, widths 4096, 4096 tokens) keep the run to about a minute on 2 CPU cores.

    python scripts/bench_analysis.py            # writes bench/analysis.md
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import best_time, write_markdown

from lgeo_jax.analysis import DeviceSAE, adapter_pass
from lgeo_jax.sae import SAE, SAEConfig

D, WIDTH, TOKENS, BATCH = 1024, 4096, 4096, 1024


def make_sae(rng, arch: str) -> SAE:
    w_dec = rng.normal(size=(WIDTH, D)).astype(np.float32) / np.sqrt(D)
    params = {"W_enc": np.ascontiguousarray(w_dec.T), "W_dec": w_dec, "b_enc": np.full(WIDTH, -0.05, np.float32),
              "b_dec": np.zeros(D, np.float32)}
    if arch == "jumprelu":
        params["threshold"] = np.full(WIDTH, 0.05, np.float32)
    return SAE(SAEConfig(D, WIDTH, arch), params, 1.0)


def numpy_pass(base: np.ndarray, delta: np.ndarray, gs: SAE, sae: SAE) -> float:
    """The same per-batch work in numpy; returns a checksum so nothing is optimised away."""
    g, s = gs.params, sae.params
    total, cka = 0.0, [np.zeros((D, D)) for _ in range(3)]

    def gs_forward(x):
        pre = x @ g["W_enc"] + g["b_enc"]
        f = np.where(pre > g["threshold"], np.maximum(pre, 0), 0).astype(np.float32)
        return f, f @ g["W_dec"] + g["b_dec"]

    for start in range(0, TOKENS, BATCH):
        b, d = base[start:start + BATCH], delta[start:start + BATCH]
        f_d, d_hat = gs_forward(d)
        f_b, b_hat = gs_forward(b)
        _, a_hat = gs_forward(b + d)
        f_s = np.maximum((d - s["b_dec"]) @ s["W_enc"] + s["b_enc"], 0)
        s_hat = f_s @ s["W_dec"] + s["b_dec"]
        for x_hat in (d_hat, a_hat - b_hat, s_hat):
            err = np.sum((d.astype(np.float64) - x_hat) ** 2, axis=1)
            total += float(np.sum(np.sqrt(err / np.sum(d.astype(np.float64) ** 2, axis=1))))
        on_d, on_b = f_d > 0, f_b > 0
        total += float((on_d & on_b).sum() + (on_d & np.roll(on_b, BATCH // 2, axis=0)).sum())
        for pair in ((d, b), (b, b + d), (d, np.roll(b, BATCH // 2, axis=0)), (np.roll(b, BATCH // 2, axis=0), b + d)):
            xc, yc = (p - p.mean(0) for p in pair)
            cka[0] += (xc.T @ yc).astype(np.float64)
            cka[1] += (xc.T @ xc).astype(np.float64)
            cka[2] += (yc.T @ yc).astype(np.float64)
    return total + float(sum(c.sum() for c in cka))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/analysis.md")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = (rng.normal(size=(TOKENS, D)) + 3).astype(np.float32)
    delta = (0.2 * rng.normal(size=(TOKENS, D))).astype(np.float32)
    gs, sae = make_sae(rng, "jumprelu"), make_sae(rng, "relu")
    dev_gs, dev_sae = DeviceSAE(gs), {0: DeviceSAE(sae)}

    def ours():
        batches = ((base[i:i + BATCH], delta[i:i + BATCH]) for i in range(0, TOKENS, BATCH))
        return adapter_pass(batches, dev_gs, dev_sae).summary()

    t_ours = best_time(ours, repeats=args.repeats)
    t_numpy = best_time(lambda: numpy_pass(base, delta, gs, sae), repeats=args.repeats)
    flops = TOKENS * (4 * 2 * 2 * D * WIDTH + 4 * 3 * 2 * D * D)  # 4 SAE forwards (enc+dec), 4 CKA x 3 products
    lines = [
        f"Shapes: d {D}, dictionary and delta-SAE width {WIDTH}, {TOKENS} tokens in batches of {BATCH}; "
        "one adapter, one seed. Median of "
        f"{args.repeats} runs after a warm-up (compilation excluded).",
        "",
        "| implementation | time (s) | tokens/s | GFLOP/s (matmuls) | ratio vs numpy |",
        "|---|---|---|---|---|",
        f"| lgeo_jax.analysis.adapter_pass | {t_ours:.2f} | {TOKENS / t_ours:,.0f} | {flops / t_ours / 1e9:.0f} | "
        f"{t_numpy / t_ours:.2f}x |",
        f"| numpy float32 matmuls + float64 sums | {t_numpy:.2f} | {TOKENS / t_numpy:,.0f} | "
        f"{flops / t_numpy / 1e9:.0f} | 1.00x |",
    ]
    lines += ["", f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine: "
              "compare the ratio, not absolute throughput)."]
    print("\n".join(lines))
    write_markdown(args.out, "Analysis token pass (Tables 5, 6, 8, 11)", lines)


if __name__ == "__main__":
    main()
