"""`lgeo` command line. Stages plug in here as they land (see README)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _run(args: argparse.Namespace) -> int:
    """Until the full pipeline lands: builds the config's tiny Gemma-2, saves it as an HF checkpoint, loads it
    back, stacks one random adapter per configured rank and extracts base + adapter residuals in one pass."""
    import jax
    import numpy as np
    import yaml

    import lgeo_jax
    from lgeo_jax.lora import AdapterSpec

    with open(args.config) as f:
        raw = yaml.safe_load(f)
    b = raw["model"]["builtin"]
    cfg = lgeo_jax.Gemma2Config(
        vocab_size=b.get("vocab_size") or 1024, d_model=b["d_model"], n_heads=b["n_heads"],
        n_kv_heads=b["n_kv_heads"], head_dim=b["head_dim"], mlp_dim=b["mlp_dim"],
        layer_types=lgeo_jax.model._config._alternating(b["n_layers"]), sliding_window=b["sliding_window"],
        query_pre_attn_scalar=float(b["head_dim"]))
    ckpt = os.path.join(args.out, "model")
    lgeo_jax.save_model(lgeo_jax.init_model(cfg, seed=b.get("seed", 0)), ckpt)
    model = lgeo_jax.load_model(ckpt)
    ranks = raw["lora"]["ranks"]
    adapters = lgeo_jax.init_adapters(cfg, [AdapterSpec(rank=r, alpha=2 * r, name=f"r{r}") for r in ranks],
                                      random_b=True)
    layers = raw["extract"]["layers"]
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (16, 64))
    out = lgeo_jax.residuals(model, ids, layers=layers, adapters=adapters)
    out.block_until_ready()
    t0 = time.perf_counter()
    out = jax.block_until_ready(lgeo_jax.residuals(model, ids, layers=layers, adapters=adapters))
    dt = time.perf_counter() - t0
    delta = np.linalg.norm(np.asarray(out[1:] - out[:1]), axis=-1).mean(axis=(2, 3))  # [adapters, layers]
    print(f"residuals {tuple(out.shape)} for base + ranks {ranks} at layers {layers}: "
          f"{ids.size / dt:,.0f} tokens/s ({ids.size * out.shape[0] / dt:,.0f} token-passes/s)")
    for r, row in zip(ranks, delta, strict=True):
        print(f"  rank {r:>3}: mean ||delta|| per layer " + "  ".join(f"{v:.4f}" for v in row))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lgeo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study for CONFIG")
    run.add_argument("config")
    run.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return {"run": _run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
