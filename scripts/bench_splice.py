"""The splice pass (`lgeo_jax.lora.splice`: base + 4 adapters in one stacked pass, then every adapter's model
continued from layer L with its residual replaced by each of the four splices, KL and cross-entropy on device)
vs transformers + PEFT with a forward hook on block L (per adapter: the adapted and base passes, then one hooked
pass per splice, SAEs and KL in torch), on the same mid-size random Gemma-2, inputs and SAEs.

    python scripts/bench_splice.py                                   # the bench/splice.md table
    python scripts/bench_splice.py --shapes 1x32 --layers 2 --out /tmp/splice.md   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import benchlib
import numpy as np
import peft
import torch
import transformers
from benchlib import interleaved_times, mid_size_hf_config, write_markdown

import lgeo_jax
from lgeo_jax.analysis import splices_for
from lgeo_jax.lora import SpliceInput, splice
from lgeo_jax.sae import SAE, SAEConfig

RANKS = (4, 8, 16, 32)
SHAPES = "1x64,2x128,4x128"


def random_sae(d: int, width: int, seed: int) -> SAE:
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(0, d ** -0.5, (d, width)), "b_enc": rng.normal(0, 0.01, width),
              "W_dec": rng.normal(0, width ** -0.5, (width, d)), "b_dec": rng.normal(0, 0.01, d)}
    return SAE(SAEConfig(d_in=d, d_sae=width), {k: v.astype(np.float32) for k, v in params.items()}, 1.3)


def torch_recon(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    p = {k: torch.as_tensor(v) for k, v in sae.params.items()}
    f = torch.relu((x / sae.scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    return (f @ p["W_dec"] + p["b_dec"]) * sae.scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default=SHAPES, help="batch x seq shapes, comma-separated")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/splice.md")
    args = p.parse_args()

    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(mid_size_hf_config(args.layers)).eval()
    d, layer = hf.config.hidden_size, args.layers // 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    delta = [random_sae(d, 4 * d, i) for i in range(len(RANKS))]
    splices = splices_for(delta, random_sae(d, 4 * d, 99), random_seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(f"{tmp}/base")
        pefts = []
        for r in RANKS:
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  init_lora_weights=False, task_type="CAUSAL_LM")
            one = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
            one.save_pretrained(f"{tmp}/r{r}")
            pefts.append(one.base_model.model)
        model = lgeo_jax.load_model(f"{tmp}/base")
        adapters = [lgeo_jax.load_adapter(f"{tmp}/r{r}") for r in RANKS]

    def hooked(m, ids, replace=None):
        """Logits [B, T, V] and the residual after block `layer` (replaced by `replace` when given)."""
        seen = {}

        def hook(module, inputs, output):
            if replace is not None:
                return (replace, *output[1:]) if isinstance(output, tuple) else replace
            seen["h"] = output[0] if isinstance(output, tuple) else output

        handle = m.model.layers[layer].register_forward_hook(hook)
        try:
            return m(ids).logits.float(), seen.get("h")
        finally:
            handle.remove()

    def torch_splice(t_ids):
        with torch.no_grad():
            logits_base, h_base = hooked(hf, t_ids)
            nll = torch.nn.functional.cross_entropy
            targets = t_ids[:, 1:].reshape(-1)
            out = [nll(logits_base[:, :-1].reshape(-1, logits_base.shape[-1]), targets, reduction="none")]
            for i, m in enumerate(pefts):
                logits_a, h_a = hooked(m, t_ids)
                logp_a = torch.log_softmax(logits_a[:, :-1], -1)
                for s in splices:
                    sae = s.saes if s.saes is None or isinstance(s.saes, SAE) else s.saes[i]
                    if sae is None:
                        r = h_base
                    elif s.on is SpliceInput.DELTA:
                        r = h_base + torch_recon(sae, h_a - h_base)
                    else:
                        r = h_base + torch_recon(sae, h_a) - torch_recon(sae, h_base)
                    logp_v = torch.log_softmax(hooked(m, t_ids, r)[0][:, :-1], -1)
                    out.append(torch.sum(logp_a.exp() * (logp_a - logp_v), -1))
            return out

    load = benchlib.load_average()
    lines = [
        f"**Under load** (1/5/15-min load average at start {load}; other engineers' jobs share the 2 cores; a quiet "
        f"run follows later). Mid-size random Gemma-2 (d_model 512, {args.layers} layers, 8 q / 4 kv heads, head_dim "
        f"64, MLP 2048, vocab 8192), float32; adapters of ranks {', '.join(map(str, RANKS))} on q,k,v,o; splice at "
        f"layer {layer}; four splices (base only, delta SAE, dictionary difference, random-init SAE; ReLU SAEs of "
        f"width {4 * d}). Throughput in spliced token-passes/s = batch x seq x {len(RANKS)} adapters x "
        f"{len(splices)} splices per second; median of {args.repeats} runs taken in turns after warm-up. The torch "
        "reference cannot start at block L: each splice is a whole hooked forward.",
        "",
        "| batch x seq | lgeo splice (token-passes/s) | HF + PEFT + hook | ratio | max abs KL difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, seq))
        t_ids = torch.as_tensor(ids)
        ours = splice(model, adapters, ids, layer=layer, splices=splices)
        theirs = torch_splice(t_ids)
        ref = np.stack([k.numpy().reshape(-1) for k in theirs[1:]]).reshape(len(RANKS), len(splices), -1)
        diff = float(np.abs(ours.kl.transpose(1, 0, 2) - ref).max())
        times = interleaved_times({"ours": lambda ids=ids: splice(model, adapters, ids, layer=layer, splices=splices),
                                   "torch": lambda t_ids=t_ids: torch_splice(t_ids)}, repeats=args.repeats)
        work = batch * seq * len(RANKS) * len(splices)
        rate = {k: work / v for k, v in times.items()}
        lines.append(f"| {batch} x {seq} | {rate['ours']:,.0f} | {rate['torch']:,.0f} | "
                     f"**{rate['ours'] / rate['torch']:.2f}x** | {diff:.1e} |")
        print(lines[-1], flush=True)
    write_markdown(args.out, "Splice evaluation pass", lines)


if __name__ == "__main__":
    main()
