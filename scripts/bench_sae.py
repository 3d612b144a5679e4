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
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lgeo_jax.sae import Arch, SAEConfig, SAETrainConfig, estimate_sae_memory
from lgeo_jax.sae._models import init_params
from lgeo_jax.sae._step import SAEState, make_optimizer
from lgeo_jax.sae._train import _multi_step


def matmul_gflops(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """float32 n^3 matmul GFLOP/s of JAX and torch measured now: the ceiling under this run's CPU load."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda u: u @ u)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        mm(a).block_until_ready()
    jax_rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    b = torch.ones(n, n)
    b @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        b @ b
    return jax_rate, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


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
             f"1-min load average {os.getloadavg()[0]:.1f} at start.", "",
             "| architecture | ours s / step | SAELens s / step | SAELens / ours |", "|---|---|---|---|"]
    for arch in archs:
        tc = arch_train_config(arch, d_sae, k, steps + 1)
        ours = time_jax(x[None], tc.sae_config(d), steps, group=1, tc=tc)
        lens = time_saelens_arch(arch, x, d_sae, k, steps)
        lines.append(f"| {arch.value} | {ours:.4f} | {lens:.4f} | {lens / ours:.2f}x |")
    lines.append(f"\n1-min load average {os.getloadavg()[0]:.1f} at end.")
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
    ap.add_argument("--out", default="bench/sae.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = SAEConfig(args.d_in, args.d_sae)
    x = np.random.default_rng(0).normal(size=(args.n_sae, args.batch, args.d_in)).astype(np.float32)
    flop_per = 12 * args.d_in * args.d_sae  # per SAE-token

    load0 = os.getloadavg()[0]
    jax_ceiling, torch_ceiling = matmul_gflops()
    rows = []
    per_step = time_jax(x, cfg, args.steps, group=args.n_sae)
    rows.append(("JAX, all SAEs vmapped in one jitted step", per_step, args.n_sae))
    rows.append(("JAX, same code one SAE at a time (loop)", time_jax(x, cfg, args.steps, group=1), args.n_sae))
    rows.append(("plain PyTorch trainer, one SAE at a time", time_torch(x, args.d_sae, args.steps), args.n_sae))
    if not args.skip_saelens:
        rows.append(("SAELens SAETrainer (1 SAE; its only mode)", time_saelens(x, args.d_sae, args.steps), 1))

    jax_ceiling2, torch_ceiling2 = matmul_gflops()
    ceiling = {"JAX": (jax_ceiling + jax_ceiling2) / 2, "torch": (torch_ceiling + torch_ceiling2) / 2}
    base = args.n_sae * args.batch / per_step
    lines = [
        "# SAE training throughput", "",
        f"Shape d_in={args.d_in}, d_sae={args.d_sae}, {args.n_sae} SAEs, batch {args.batch} tokens, "
        f"{args.steps} timed steps after one warm-up; float32; {jax.device_count()} JAX device(s) on "
        f"{platform.machine()} ({torch.get_num_threads()} torch threads). SAE-tokens/s = tokens x SAEs per second; "
        "GFLOP/s counts 12 d_in d_sae per SAE-token.", "",
        f"Ceiling = float32 2048^3 matmul measured in this run (mean of before/after): JAX {ceiling['JAX']:.0f}, "
        f"torch {ceiling['torch']:.0f} GFLOP/s (ENV_NOTES quotes 340 / 178 on an idle machine); 1-min load average "
        f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} cores (other jobs share them).",
        "", "| trainer | s / step (all its SAEs) | SAE-tokens/s | GFLOP/s | % of its matmul ceiling | vs vmapped |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec, n in rows:
        rate = n * args.batch / sec
        gflops = rate * flop_per / 1e9
        limit = ceiling["JAX"] if name.startswith("JAX") else ceiling["torch"]
        lines.append(f"| {name} | {sec:.3f} | {rate:,.0f} | {gflops:.0f} | {100 * gflops / limit:.0f}% | "
                     f"{rate / base:.2f}x |")
    mem = estimate_sae_memory(3584, 16384, 24, 512, {"model": 8, "data": 1})
    lines += ["", f"Paper scale (24 SAEs of 3584 x 16384, batch 512) on an 8-way SAE mesh: {mem.describe()}.",
              f"On one device: {estimate_sae_memory(3584, 16384, 24, 512, {}).describe()}."]
    archs = [Arch(a) for a in args.archs.split(",") if a]
    if archs:
        lines += ["", "## Per architecture vs SAELens", ""]
        lines += arch_table(x[0], args.d_sae, args.k, args.arch_steps or args.steps, archs)
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

if __name__ == "__main__":
    main()
