"""Base + 4 adapters (ranks 4/8/16/32) in ONE jitted pass vs (a) 5 separate JAX passes and (b) transformers +
PEFT switching adapters, on the same mid-size random Gemma-2, input and machine.

    python scripts/bench_lora.py [--batch 4 --seq 256 --layers 8]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import jax
import numpy as np
import peft
import torch
import transformers
from benchlib import interleaved_times, mid_size_hf_config, write_markdown
from flax import nnx

import lgeo_jax
from lgeo_jax.lora import stacked_lora

RANKS = (4, 8, 16, 32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default="bench/lora.md")
    args = p.parse_args()

    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(mid_size_hf_config(args.layers)).eval()
    ids = np.random.default_rng(0).integers(0, 8192, (args.batch, args.seq))
    layers = list(range(args.layers))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(f"{d}/base")
        peft_model = None
        for r in RANKS:
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  init_lora_weights=False, task_type="CAUSAL_LM")
            one = peft.get_peft_model(copy.deepcopy(hf), cfg)
            one.save_pretrained(f"{d}/r{r}")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), f"{d}/r{RANKS[0]}", adapter_name=f"r{RANKS[0]}")
        for r in RANKS[1:]:
            peft_model.load_adapter(f"{d}/r{r}", adapter_name=f"r{r}")
        peft_model.eval()
        model = lgeo_jax.load_model(f"{d}/base")
        adapters = [lgeo_jax.load_adapter(f"{d}/r{r}") for r in RANKS]

    stacked = lgeo_jax.concat_adapters(adapters)

    def one_pass():
        jax.block_until_ready(lgeo_jax.residuals(model, ids, layers=layers, adapters=stacked))

    graphdef, state = nnx.split(model)

    @jax.jit
    def adapter_only(state, lora, ids):
        """One adapted model on its own (no base slot): what a per-adapter loop would run."""
        m = nnx.merge(graphdef, state)
        x, positions, valid = m._prepare(ids, None, 1, None)
        return m.run_blocks(x, positions, valid, n_layers=len(layers), capture=tuple(layers), lora=lora)[1]

    single = [stacked_lora(a, with_base=False) for a in adapters]
    j_ids = jax.numpy.asarray(ids)

    def separate_passes():
        jax.block_until_ready(lgeo_jax.residuals(model, ids, layers=layers))
        for lora in single:
            jax.block_until_ready(adapter_only(state, lora, j_ids))

    t_ids = torch.as_tensor(ids)

    def peft_switching():
        with torch.no_grad():
            with peft_model.disable_adapter():
                peft_model.base_model.model.model(t_ids, output_hidden_states=True)
            for r in RANKS:
                peft_model.set_adapter(f"r{r}")
                peft_model.base_model.model.model(t_ids, output_hidden_states=True)

    token_passes = ids.size * (1 + len(RANKS))
    times = interleaved_times({"one": one_pass, "sep": separate_passes, "peft": peft_switching}, repeats=3)
    lines = [
        f"Mid-size random Gemma-2 (d_model 512, {args.layers} layers, 8 q / 4 kv heads, head_dim 64, MLP 2048), "
        f"float32, batch {args.batch} x seq {args.seq}, all {args.layers} layers captured; base + adapters of "
        f"ranks {', '.join(map(str, RANKS))} on q,k,v,o (non-zero B); median of 3 runs taken in turns after warm-up.",
        "",
        "| method | seconds | token-passes/s (tokens x 5 models) |",
        "|---|---|---|",
        f"| lgeo_jax: base + 4 adapters in one jitted pass | {times['one']:.3f} | {token_passes / times['one']:,.0f} |",
        f"| lgeo_jax: 5 separate jitted passes (base, then each adapter alone) | {times['sep']:.3f} | "
        f"{token_passes / times['sep']:,.0f} |",
        f"| transformers + PEFT, switching adapters (5 passes) | {times['peft']:.3f} | "
        f"{token_passes / times['peft']:,.0f} |",
        "",
        f"One pass vs 5 JAX passes: **{times['sep'] / times['one']:.2f}x**; one pass vs transformers + PEFT: "
        f"**{times['peft'] / times['one']:.2f}x**.",
    ]
    print("\n".join(lines))
    write_markdown(args.out, "Multi-adapter residual extraction", lines)


if __name__ == "__main__":
    main()
