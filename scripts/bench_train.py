"""LoRA training throughput: 4 ranks in one stacked jitted step vs the same 4 ranks trained one after another
(lgeo_jax), vs transformers + PEFT (torch, 4 runs one after another), same model, data and batch shapes.

    python scripts/bench_train.py [--layers 4 --batch 4 --seq 64 --steps 8 --ranks 4 8 16 32]

Throughput is adapter-tokens/s: real tokens per optimizer step x adapters trained, over the steady-state
steps (the compiling first step of each run and torch's first warm-up steps excluded). The GFLOP/s column
counts 4 x (matrix parameters) FLOPs per adapter-token: the forward pass and the backward pass to the
activations (the frozen base needs no weight gradients); attention scores and LoRA factors are ignored.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import jax
import numpy as np
import peft
import torch
import transformers
from benchlib import mid_size_hf_config, write_markdown
from flax import nnx

import lgeo_jax
from lgeo_jax.data import TokenizedExample
from lgeo_jax.lora import AdapterSpec, init_adapters
from lgeo_jax.train import TrainConfig, train_lora, train_sequential

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def examples(n: int, seq: int, vocab: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.ones(seq, np.int32)
        mask[0] = 0
        out.append(TokenizedExample(rng.integers(3, vocab, seq).astype(np.int32), mask, i, False))
    return out


def peft_tokens_per_s(hf, data, ranks, batch: int, steps: int, warmup: int) -> float:
    """Each rank trained alone with PEFT: AdamW, grad clipping, dropout as configured, float32."""
    ids = torch.tensor(np.stack([e.input_ids for e in data]), dtype=torch.long)
    seconds = tokens = 0.0
    for r in ranks:
        model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                                        target_modules=TARGETS,
                                                                        task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for step in range(warmup + steps):
            x = ids[(step * batch) % len(data):][:batch]
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad()
            if step >= warmup:
                seconds += time.perf_counter() - t0
                tokens += x.numel() - x.shape[0]  # targets: every token after the first
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--out", default="bench/train.md")
    args = p.parse_args()

    torch.manual_seed(0)
    hf_cfg = mid_size_hf_config(args.layers)
    hf = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    data = examples(args.batch * (args.steps + 2), args.seq, hf_cfg.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = lgeo_jax.load_model(d)
    specs = [AdapterSpec(rank=r, alpha=2 * r, dropout=0.05, name=f"r{r}") for r in args.ranks]
    matrix_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)) if x.ndim >= 2)  # incl. tied head
    flop_per_token = 4 * matrix_params
    load_before = os.getloadavg()[0]
    rows = []
    for dtype in ("float32", "bfloat16"):
        train = TrainConfig(lr=1e-3, warmup_steps=0, warmup_fraction=None, batch_size=args.batch,
                            grad_accum_steps=1, epochs=1, max_steps=args.steps + 1, compute_dtype=dtype)
        stack = init_adapters(model.config, specs, seed=0)
        stacked = train_lora(model, stack, data, train, length_buckets=1, progress=False).tokens_per_second()
        _, results = train_sequential(model, stack, data, train, progress=False)
        # one-by-one: the runs' steady-state times add up
        seq_tps = sum(r.step_tokens[~r.first_of_shape].sum() for r in results) / sum(
            r.step_seconds[~r.first_of_shape].sum() for r in results)
        rows.append((f"lgeo_jax, {len(specs)} ranks in one stacked step ({dtype})", stacked))
        rows.append((f"lgeo_jax, {len(specs)} ranks one after another ({dtype})", float(seq_tps)))
        print(rows[-2], rows[-1])
    torch_tps = peft_tokens_per_s(hf, data, args.ranks, args.batch, args.steps, warmup=2)
    rows.append((f"transformers + PEFT, {len(specs)} ranks one after another (float32, eager)", torch_tps))
    print(rows[-1])
    lines = [
        f"Model: Gemma-2 d 512, {args.layers} layers, 8 heads / 4 kv, head_dim 64, MLP 2048, vocab 8192; "
        f"LoRA on q/k/v/o, ranks {args.ranks}, alpha 2r, dropout 0.05; batch {args.batch} x {args.seq} tokens; "
        f"{args.steps} timed optimizer steps per run (AdamW, clipping 1.0).",
        "",
        "Throughput = adapter-tokens/s (tokens per step x adapters trained), steady state, compilation excluded.",
        "",
        f"Load average (1 min) before / after the run: {load_before:.1f} / {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (other jobs share the machine; absolute numbers shrink with load).",
        "",
        "| setup | adapter-tokens/s | vs PEFT | est. GFLOP/s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {tps:,.0f} | {tps / torch_tps:.2f}x | {tps * flop_per_token / 1e9:.1f} |"
              for name, tps in rows]
    write_markdown(args.out, "LoRA training throughput", lines)


if __name__ == "__main__":
    main()
