"""Benchmark: SAE training throughput, many SAEs vmapped vs one at a time vs plain torch vs SAELens, and one
SAE of each architecture (ReLU + L1, TopK and BatchTopK with AuxK, JumpReLU) against SAELens' own trainer.

The first table runs the same math on the same random data (ReLU SAE, MSE summed over d + L1 on activations,
Adam, unit-norm decoder rows renormalised after each step; SAELens uses its own standard trainer, whose
L1 is decoder-norm weighted instead). Throughput is in SAE-tokens/s: tokens x SAEs trained per second,
so a loop over SAEs and one vmapped step over all of them compare directly. FLOPs per SAE-token are
about 12 d_in d_sae (encoder + decoder forward, twice that backward). The per-architecture table times one
training step of one SAE, ours (`lgeo_jax.sae` train step, jitted) vs SAELens' `SAETrainer.step` with its
training SAE of that architecture (whose loss ours equals: tests/test_sae_losses.py), same shapes and data.
Writes bench/sae.md (or --out).

    python scripts/bench_sae.py --d-in 512 --d-sae 2048 --n-sae 24 --batch 512 --steps 4
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from benchlib import jax_matmul_gflops, load_average, torch_matmul_gflops, write_markdown

from lgeo_jax.sae import Arch, ArraySource, SAEConfig, SAETrainConfig, estimate_sae_memory, train_saes
from lgeo_jax.sae._models import init_params
from lgeo_jax.sae._step import SAEState, make_optimizer
from lgeo_jax.sae._train import _multi_step
from lgeo_jax.sharding import make_mesh


def jax_states(n: int, cfg: SAEConfig, optimizer, seed0: int) -> SAEState:
    params = jax.vmap(lambda k: init_params(k, cfg))(jnp.stack([jax.random.key(seed0 + i) for i in range(n)]))
    return SAEState(params, jax.vmap(optimizer.init)(params), jnp.zeros((n, cfg.d_sae), jnp.int32),
                    jnp.ones(n, jnp.float32))


def time_jax(x: np.ndarray, cfg: SAEConfig, steps: int, group: int, tc: SAETrainConfig | None = None) -> float:
    """Seconds per step for all SAEs, stepping ``group`` SAEs per jitted call (group = n: vmapped; 1: a loop)."""
    n = x.shape[0]
    tc = SAETrainConfig(steps=steps + 1) if tc is None else tc
    opt = make_optimizer(tc, steps + 1)
    step = jax.jit(functools.partial(_multi_step, sae_cfg=cfg, train_cfg=tc, optimizer=opt,
                                     dead_steps=tc.dead_window_steps(steps + 1)), donate_argnums=0)
    states = [jax_states(group, cfg, opt, i) for i in range(0, n, group)]
    xs = [jnp.asarray(x[i:i + group]) for i in range(0, n, group)]
    l1 = jnp.full((group,), 0.1 if cfg.architecture is Arch.RELU else 0.0, jnp.float32)

    def one_round(t):
        for j in range(len(states)):
            states[j], _ = step(states[j], xs[j], l1, jnp.asarray(t, jnp.int32))
        jax.block_until_ready(states)

    one_round(0)  # compile
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        one_round(t)
    return (time.perf_counter() - t0) / steps


def time_torch(x: np.ndarray, d_sae: int, steps: int) -> float:
    """Plain PyTorch trainer with the same math, one SAE after another (how one would write it by hand)."""
    n, _, d = x.shape
    f = d_sae
    saes = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        w_dec = torch.randn(f, d, generator=g)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        p = {"W_enc": w_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(f, requires_grad=True),
             "W_dec": w_dec.requires_grad_(), "b_dec": torch.zeros(d, requires_grad=True)}
        saes.append((p, torch.optim.Adam(p.values(), lr=1e-4)))
    xt = torch.from_numpy(x)

    def one_round():
        for i, (p, opt) in enumerate(saes):
            xi = xt[i]
            acts = torch.relu((xi - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
            x_hat = acts @ p["W_dec"] + p["b_dec"]
            loss = ((x_hat - xi) ** 2).sum(-1).mean() + 0.1 * acts.sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)

    one_round()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_round()
    return (time.perf_counter() - t0) / steps


def time_saelens(x: np.ndarray, d_sae: int, steps: int) -> float:
    """SAELens's own `SAETrainer` on one SAE fed from memory; seconds per step per SAE."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    _, b, d = x.shape
    batch = torch.from_numpy(x[0])

    def run(n_steps: int) -> float:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=0.1))
        cfg = SAETrainerConfig(total_training_samples=n_steps * b, train_batch_size_samples=b, lr=1e-4,
                              lr_end=1e-4)
        trainer = SAETrainer(cfg, sae, iter([batch] * (n_steps + 2)))
        t0 = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - t0

    run(1)  # warm-up
    return run(steps) / steps


def arch_train_config(arch: Arch, d_sae: int, k: int, steps: int) -> SAETrainConfig:
    """Our settings for one architecture, with SAELens' defaults where it has them (AuxK 1.0, L0 1.0, ...)."""
    # dead window = the whole run: like SAELens (1,000-step window) no latent is dead in a short timing, so
    # neither side runs AuxK and both do the same work
    return SAETrainConfig(architecture=arch, width=d_sae, steps=steps, k=k if arch.uses_k else None,
                          l1=0.1 if arch is Arch.RELU else None, dead_window_fraction=1.0)


def time_saelens_arch(arch: Arch, x: np.ndarray, d_sae: int, k: int, steps: int) -> float:
    """Seconds per `SAETrainer.step` of SAELens' training SAE of this architecture (one SAE, our batch)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    b, d = x.shape
    make = {Arch.RELU: lambda: StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=d_sae, l1_coefficient=0.1)),
            Arch.TOPK: lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k)),
            Arch.BATCHTOPK: lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k)),
            Arch.JUMPRELU: lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=d_sae))}[arch]
    cfg = SAETrainerConfig(total_training_samples=(steps + 1) * b, train_batch_size_samples=b, lr=1e-4, lr_end=1e-4)
    trainer = SAETrainer(cfg, make(), data_provider=iter(()))  # batches come from us
    batch = torch.from_numpy(x)
    trainer.step(batch)  # warm-up
    trainer.n_training_steps += 1
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
        trainer.n_training_steps += 1
    return (time.perf_counter() - t0) / steps


def arch_table(x: np.ndarray, d_sae: int, k: int, steps: int, archs: list[Arch]) -> list[str]:
    b, d = x.shape
    lines = [f"One SAE per architecture, d_in={d}, d_sae={d_sae}, batch {b}, k={k} (TopK / BatchTopK), {steps} timed "
             "steps after one warm-up, float32; SAELens = its `SAETrainer.step` with that architecture's training "
             "SAE (same loss as ours; it also clips gradients at norm 1 and keeps its own dead-latent counters). "
             f"1-min load average {load_average()[0]:.2f} at start.", "",
             "| architecture | ours s / step | SAELens s / step | SAELens / ours |", "|---|---|---|---|"]
    for arch in archs:
        tc = arch_train_config(arch, d_sae, k, steps + 1)
        ours = time_jax(x[None], tc.sae_config(d), steps, group=1, tc=tc)
        lens = time_saelens_arch(arch, x, d_sae, k, steps)
        lines.append(f"| {arch.value} | {ours:.4f} | {lens:.4f} | {lens / ours:.2f}x |")
    lines.append(f"\n1-min load average {load_average()[0]:.2f} at end.")
    return lines


def planted_rows(dirs: np.ndarray, rows: int, active: float, rng: np.random.Generator) -> np.ndarray:
    """Sparse non-negative codes (`active` of the [M, D] unit `dirs` on average, exponential sizes) times the
    directions plus 1% noise: data with a dictionary to find."""
    m, d = dirs.shape
    codes = (rng.random((rows, m)) < active / m) * rng.exponential(1.0, (rows, m))
    return (codes @ dirs + 0.01 * rng.normal(size=(rows, d))).astype(np.float32)


def bf16_effect(d_in: int, d_sae: int, n_sae: int, batch: int, steps: int) -> list[str]:
    """The same SAEs (init, data, order) trained with float32 and with bf16 matmuls: held-out L0 and FVU, and how
    far the bf16 decoder rows are from the float32 run's (cosine of row i with row i)."""
    rng = np.random.default_rng(1)
    dirs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in rng.normal(size=(n_sae, d_sae, d_in))]
    streams = [planted_rows(d, steps * batch // 4, 32.0, rng) for d in dirs]  # 4 epochs
    held = [planted_rows(d, 1024, 32.0, rng) for d in dirs]
    runs, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        tc = SAETrainConfig(width=d_sae, batch_size=batch, steps=steps, lr=3e-3, lr_warmup_steps=steps // 10,
                            l1=3.0, l1_warmup_steps=steps // 5, eval_rows=1024, log_every=steps, eval_every=steps,
                            checkpoint_every=steps, matmul_dtype=dtype)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            runs[dtype] = train_saes(ArraySource(streams, held_out=held), tc.sae_config(d_in), tc, [tc.l1] * n_sae,
                                     list(range(n_sae)), out, mesh=make_mesh(devices=jax.devices()[:1]),
                                     progress=False, plot=False)
            seconds[dtype] = time.perf_counter() - t0
    lines = [f"{n_sae} ReLU SAEs of {d_in} x {d_sae} (L1 3.0, batch {batch}, {steps} steps, lr 3e-3) on planted "
             f"data (~32 of {d_sae} unit directions active per row, 1% noise), trained twice from the same init, "
             "data and order: float32, and `sae.matmul_dtype: bfloat16`; held-out metrics on 1,024 rows per SAE "
             f"(mean over the SAEs; min-max in brackets). Load average {load_average()[0]:.2f}.", "",
             "| matmuls | job seconds (incl. compile) | held-out L0 | held-out FVU | decoder row cos to the float32 "
             "run (median / min) |", "|---|---:|---:|---:|---:|"]
    w32 = [sae.params["W_dec"] for sae in runs["float32"].saes]
    for dtype, result in runs.items():
        l0 = [m["heldout_l0"] for m in result.final_metrics]
        fvu = [m["heldout_fvu"] for m in result.final_metrics]
        cos = np.concatenate([np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                              for a, b in zip(w32, (sae.params["W_dec"] for sae in result.saes), strict=True)])
        lines.append(f"| {dtype} | {seconds[dtype]:.1f} | {np.mean(l0):.2f} [{min(l0):.2f}-{max(l0):.2f}] | "
                     f"{np.mean(fvu):.4f} [{min(fvu):.4f}-{max(fvu):.4f}] | {np.median(cos):.5f} / {cos.min():.5f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--n-sae", type=int, default=24)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-saelens", action="store_true")
    ap.add_argument("--k", type=int, default=32, help="active latents of the TopK / BatchTopK SAEs")
    ap.add_argument("--archs", default="relu,topk,batchtopk,jumprelu",
                    help="architectures of the per-architecture table vs SAELens ('' skips it)")
    ap.add_argument("--arch-steps", type=int, default=None, help="timed steps per architecture (default --steps)")
    ap.add_argument("--effect-saes", type=int, default=4, help="SAEs of the bf16-effect table (0 skips it)")
    ap.add_argument("--effect-steps", type=int, default=1000, help="training steps of the bf16-effect table")
    ap.add_argument("--out", default="bench/sae.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = SAEConfig(args.d_in, args.d_sae)
    x = np.random.default_rng(0).normal(size=(args.n_sae, args.batch, args.d_in)).astype(np.float32)
    flop_per = 12 * args.d_in * args.d_sae  # per SAE-token

    load0 = load_average()[0]
    ceilings = [(jax_matmul_gflops(), jax_matmul_gflops(dtype="bfloat16"), torch_matmul_gflops())]
    bf16 = SAETrainConfig(steps=args.steps + 1, matmul_dtype="bfloat16")
    rows = []
    per_step = time_jax(x, cfg, args.steps, group=args.n_sae)
    rows.append(("JAX, all SAEs vmapped in one jitted step", per_step, args.n_sae, "float32"))
    rows.append(("JAX, vmapped, `matmul_dtype: bfloat16`", time_jax(x, cfg, args.steps, group=args.n_sae, tc=bf16),
                 args.n_sae, "bfloat16"))
    rows.append(("JAX, same code one SAE at a time (loop)", time_jax(x, cfg, args.steps, group=1), args.n_sae,
                 "float32"))
    rows.append(("plain PyTorch trainer, one SAE at a time", time_torch(x, args.d_sae, args.steps), args.n_sae,
                 "torch"))
    if not args.skip_saelens:
        rows.append(("SAELens SAETrainer (1 SAE; its only mode)", time_saelens(x, args.d_sae, args.steps), 1, "torch"))
    ceilings.append((jax_matmul_gflops(), jax_matmul_gflops(dtype="bfloat16"), torch_matmul_gflops()))
    jax32, jax16, torch32 = (max(c[i] for c in ceilings) for i in range(3))  # the best of before / after
    base = args.n_sae * args.batch / per_step
    lines = [
        f"Shape d_in={args.d_in}, d_sae={args.d_sae}, {args.n_sae} SAEs, batch {args.batch} tokens, "
        f"{args.steps} timed steps after one warm-up; {jax.device_count()} JAX device(s). SAE-tokens/s = tokens x "
        "SAEs per second; GFLOP/s counts 12 d_in d_sae per SAE-token (2 forward GEMMs, 4 backward: the step itself "
        "now runs 5, b_dec's gradient being a GEMV).", "",
        f"Ceilings = 2048^3 matmuls measured in this run (best of before / after): JAX float32 {jax32:.0f}, JAX bf16 "
        f"(float32 accumulation) {jax16:.0f}, torch float32 {torch32:.0f} GFLOP/s; % of ceiling is against the "
        f"**float32** ceiling of the trainer's library for every row (the issue's yardstick). 1-min load average "
        f"{load0:.2f} at start, {load_average()[0]:.2f} at end on {os.cpu_count()} cores.",
        "", "| trainer | s / step (all its SAEs) | SAE-tokens/s | GFLOP/s | % of float32 ceiling | vs vmapped |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec, n, side in rows:
        rate = n * args.batch / sec
        gflops = rate * flop_per / 1e9
        limit = torch32 if side == "torch" else jax32
        lines.append(f"| {name} | {sec:.3f} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / limit:.0f}% | "
                     f"{rate / base:.2f}x |")
    mem = estimate_sae_memory(3584, 16384, 24, 512, {"model": 8, "data": 1})
    lines += ["", f"Paper scale (24 SAEs of 3584 x 16384, batch 512) on an 8-way SAE mesh: {mem.describe()}.",
              f"On one device: {estimate_sae_memory(3584, 16384, 24, 512, {}).describe()}."]
    if args.effect_saes:
        lines += ["", "## Effect of bf16 matmuls on the trained SAEs", ""]
        lines += bf16_effect(args.d_in, args.d_sae, args.effect_saes, args.batch, args.effect_steps)
    archs = [Arch(a) for a in args.archs.split(",") if a]
    if archs:
        lines += ["", "## Per architecture vs SAELens", ""]
        lines += arch_table(x[0], args.d_sae, args.k, args.arch_steps or args.steps, archs)
    print("\n".join(lines))
    write_markdown(args.out, "SAE training throughput", lines)


if __name__ == "__main__":
    main()
