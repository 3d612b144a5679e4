"""Base + 4 adapters (ranks 4/8/16/32) in ONE jitted pass (whole batch; micro-batched as extraction runs it with
`extract.micro_batch_tokens`' default; and with `auto`, the micro-batch tuned on the batch) vs (a) 5 separate JAX
passes and (b) transformers + PEFT switching adapters, on the same mid-size random Gemma-2 and machine, at every
batch shape from 1 x 32 to 16 x 256.

    python scripts/bench_lora.py                                  # the bench/lora.md table (quiet machine)
    python scripts/bench_lora.py --shapes 1x32,2x64 --layers 2 --no-peft --out /tmp/lora.md   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import benchlib
import jax
import numpy as np
import peft
import torch
import transformers
from benchlib import interleaved_times, mid_size_hf_config, write_markdown
from flax import nnx

import lgeo_jax
from lgeo_jax.corpus import ExtractConfig
from lgeo_jax.lora import micro_batch_size, stacked_lora, tune_micro_batch_tokens

RANKS = (4, 8, 16, 32)
SHAPES = "1x32,4x32,1x256,2x256,4x256,8x256,16x256"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default=SHAPES, help="batch x seq shapes, comma-separated")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT column")
    p.add_argument("--out", default="bench/lora.md")
    args = p.parse_args()

    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(mid_size_hf_config(args.layers)).eval()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
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
    graphdef, state = nnx.split(model)

    @jax.jit
    def adapter_only(state, lora, ids):
        """One adapted model on its own (no base slot): what a per-adapter loop would run."""
        m = nnx.merge(graphdef, state)
        x, positions, valid = m.prepare_inputs(ids, None, 1, None)
        return m.run_blocks(x, positions, valid, n_layers=len(layers), capture=tuple(layers), lora=lora)[1]

    single = [stacked_lora(a, with_base=False) for a in adapters]
    default_tokens = ExtractConfig().micro_batch_tokens  # what extraction runs unless the config says otherwise
    lines = [
        f"Mid-size random Gemma-2 (d_model 512, {args.layers} layers, 8 q / 4 kv heads, head_dim 64, MLP 2048), "
        f"float32, all {args.layers} layers captured; base + adapters of ranks {', '.join(map(str, RANKS))} on "
        f"q,k,v,o (non-zero B); median of {args.repeats} runs taken in turns after warm-up; load average at start "
        f"{benchlib.load_average()[0]:.2f}. Micro-batched: `extract.micro_batch_tokens` = {default_tokens} tokens x "
        "models per call (`micro_batch_size`, extraction's default); auto: `extract.micro_batch_tokens: auto`, the "
        "micro-batch `tune_micro_batch_tokens` picks on the batch (what extraction runs with `auto`).",
        "",
        "| batch x seq | one pass (token-passes/s) | one pass, micro-batched | one pass, auto | 5 separate passes "
        "| PEFT switching | micro-batched / separate | auto / separate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, 8192, (batch, seq))
        j_ids, t_ids = jax.numpy.asarray(ids), torch.as_tensor(ids)
        n_models = 1 + len(RANKS)
        micro = micro_batch_size(batch, seq, n_models, default_tokens)

        def one_pass(micro_batch=None, ids=ids):
            jax.block_until_ready(lgeo_jax.residuals(model, ids, layers=layers, adapters=stacked,
                                                     micro_batch=micro_batch))

        auto = micro_batch_size(batch, seq, n_models, tune_micro_batch_tokens(one_pass, batch, seq, n_models))

        def separate_passes(ids=ids, j_ids=j_ids):
            jax.block_until_ready(lgeo_jax.residuals(model, ids, layers=layers))
            for lora in single:
                jax.block_until_ready(adapter_only(state, lora, j_ids))

        def peft_switching(t_ids=t_ids):
            with torch.no_grad():
                with peft_model.disable_adapter():
                    peft_model.base_model.model.model(t_ids, output_hidden_states=True)
                for r in RANKS:
                    peft_model.set_adapter(f"r{r}")
                    peft_model.base_model.model.model(t_ids, output_hidden_states=True)

        fns = {"one": one_pass, "micro": lambda m=micro: one_pass(m), "auto": lambda m=auto: one_pass(m),
               "sep": separate_passes}
        if not args.no_peft:
            fns["peft"] = peft_switching
        times = interleaved_times(fns, repeats=args.repeats)
        rate = {k: ids.size * n_models / v for k, v in times.items()}
        peft_col = f"{rate['peft']:,.0f}" if "peft" in rate else "-"
        lines.append(f"| {batch} x {seq} | {rate['one']:,.0f} | {rate['micro']:,.0f} (b={micro}) | {rate['auto']:,.0f} "
                     f"(b={auto}) | {rate['sep']:,.0f} | {peft_col} | **{rate['micro'] / rate['sep']:.2f}x** | "
                     f"**{rate['auto'] / rate['sep']:.2f}x** |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    write_markdown(args.out, "Multi-adapter residual extraction", lines)


if __name__ == "__main__":
    main()
