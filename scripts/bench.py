"""The one-table benchmark: lgeo_jax against the PyTorch reference (scripts/reference_torch), stage by stage.

    python scripts/bench.py --profile cpu --out DIR [--quick] [--stages extract,sae_train,...]

Both sides run on the same config and the same inputs: extraction of base + 4 adapters, a LoRA training step
for the 4 ranks, corpus write and shuffled read, 24-SAE training, max-cosine, principal angles (top
subspaces included) and CKA. Each stage checks that the two sides' outputs agree (the tolerances and why
are next to each check), times the two sides in turns (a, b, a, b) so background load hits both alike,
and reports throughputs (higher is better) with the FLOP/s each side achieved against the float32 matmul
ceiling measured in this run (and MFU against the device's peak on an accelerator). numpy / scipy
baselines run in a child process with this machine's OpenBLAS slow-downs (`benchlib.SLOW_BLAS_VARS`) unset.

Writes DIR/results.json ({"stages": [{"stage", "jax", "torch", "unit", "ratio", "agree", ...}], "load_average",
"machine", "matmul_ceiling_gflops", ...}; `torch` is the reference side, numpy/scipy where named) and
DIR/results.md. `--quick` shrinks every shape to a smoke run (seconds per stage; numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from benchlib import (
    NumpyWorker,
    device_peak_tflops,
    forward_flops_per_token,
    jax_matmul_gflops,
    load_average,
    lora_flops_per_token,
    machine,
    take_turns,
    torch_matmul_gflops,
    wall,
)
from reference_torch import corpus as ref_corpus
from reference_torch import extract as ref_extract
from reference_torch import geometry as ref_geometry
from reference_torch import sae as ref_sae
from reference_torch import train_lora as ref_train

import lgeo_jax
from lgeo_jax import geometry
from lgeo_jax.corpus import CorpusSource, ExtractConfig, extract_corpus, open_corpus
from lgeo_jax.data import TokenizedExample
from lgeo_jax.lora import AdapterSpec, target_dims
from lgeo_jax.sae import ArraySource, SAEConfig, SAETrainConfig, init_params, train_saes
from lgeo_jax.train import TrainConfig, train_lora

TARGETS = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Every shape of one benchmark run."""

    model: dict  # transformers.Gemma2Config kwargs
    layers: tuple[int, ...]  # captured residual layers (corpus arrays, SAEs = adapters x layers)
    dtype: str = "float32"  # weights and activations on both sides
    torch_device: str = "cpu"
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    extract_batch: tuple[int, int] = (8, 256)
    train_batch: tuple[int, int] = (4, 64)
    train_steps: int = 5  # per timed call; the first of each call is excluded on both sides
    corpus_examples: tuple[int, int] = (16, 128)  # examples x tokens
    corpus_batch: int = 8
    read_batch: int = 512
    read_epochs: int = 4
    sae: tuple[int, int] = (512, 2048)  # d_in x d_sae, one SAE per (adapter, layer)
    sae_batch: int = 512
    sae_steps: int = 10
    max_cosine: tuple[int, int, int] = (16384, 16384, 3584)  # M x N x D
    subspace: tuple[int, int, int] = (8192, 2304, 256)  # M x D, top-K
    cka: tuple[int, int] = (8192, 2304)  # T x D; T >= 1.5 D keeps both sides in the feature-space form
    repeats: int = 3
    saelens: bool = True


_MID = dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, sliding_window=128, query_pre_attn_scalar=64)
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
# Gemma-2-2B shapes (random weights), bf16 on both sides.
_GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                  query_pre_attn_scalar=256)

PROFILES = {
    "cpu": Profile(model=_MID, layers=(1, 2, 3, 5, 6, 7)),
    "gpu": Profile(model=_GEMMA2_2B, layers=(5, 10, 13, 18, 22, 25), dtype="bfloat16", torch_device="cuda",
                   extract_batch=(8, 1024), train_batch=(4, 512), corpus_examples=(64, 512), corpus_batch=8,
                   read_batch=4096, sae=(2304, 16384), sae_batch=4096, sae_steps=20, subspace=(16384, 3584, 256),
                   cka=(16384, 3584), saelens=False),
}
QUICK = dict(model=_TINY, layers=(0, 1, 2), extract_batch=(2, 32), train_batch=(2, 16), train_steps=3,
             corpus_examples=(8, 32), corpus_batch=4, read_batch=64, read_epochs=2, sae=(64, 128), sae_batch=64,
             sae_steps=3, max_cosine=(256, 384, 64), subspace=(256, 64, 16), cka=(512, 64), repeats=1)


# ---- results -------------------------------------------------------------------------------------

def check(what: str, value: float, tol: float) -> dict:
    """One agreement check: `value` (a measured discrepancy, >= 0) must be <= `tol`."""
    value = float(value)
    return {"what": what, "value": value, "tol": tol, "ok": bool(np.isfinite(value) and value <= tol)}


def row(stage: str, jax_seconds: list[float], ref_seconds: list[float], work: float, unit: str, checks: list,
        *, reference: str, ref_kind: str, flops: float | None = None, ref_flops: float | None = None,
        shape: str = "") -> dict:
    """A table row: throughput = `work` / median seconds (work in `unit` x seconds); FLOPs are per call."""
    jax_s, ref_s = statistics.median(jax_seconds), statistics.median(ref_seconds)
    ref_flops = flops if ref_flops is None else ref_flops
    return {"stage": stage, "jax": work / jax_s, "torch": work / ref_s, "unit": unit, "ratio": ref_s / jax_s,
            "agree": {"ok": all(c["ok"] for c in checks), "checks": checks}, "reference": reference,
            "ref_kind": ref_kind, "shape": shape, "jax_seconds": jax_seconds, "torch_seconds": ref_seconds,
            "jax_gflops": None if flops is None else flops / jax_s / 1e9,
            "torch_gflops": None if ref_flops is None else ref_flops / ref_s / 1e9}


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---- shared inputs -------------------------------------------------------------------------------

class Context:
    """The profile, a scratch directory, the numpy worker, and the random model + adapters built once."""

    def __init__(self, profile: Profile, tmp: pathlib.Path, worker: NumpyWorker, quick: bool):
        self.p, self.tmp, self.worker, self.quick = profile, tmp, worker, quick
        self.torch_dtype = getattr(torch, profile.dtype)
        self._built = False

    def build(self) -> None:
        """A random Gemma-2 (every parameter random) and 4 PEFT adapters with non-zero B, saved in HF / PEFT
        format; our side loads them with `load_model` / `load_adapter`, the reference with transformers + PEFT."""
        if self._built:
            return
        import transformers

        torch.manual_seed(0)
        hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**self.p.model, attn_implementation="eager"))
        with torch.no_grad():  # HF init leaves the norms at 0; randomise them so they are exercised
            for name, param in hf.named_parameters():
                if "norm" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
        self.base_dir = self.tmp / "base"
        hf.to(self.torch_dtype).save_pretrained(self.base_dir)
        del hf
        self.model = lgeo_jax.load_model(self.base_dir)
        self.cfg = self.model.config
        self.specs = [AdapterSpec(rank=r, alpha=2.0 * r, targets=TARGETS, name=f"r{r}") for r in self.p.ranks]
        random = lgeo_jax.init_adapters(self.cfg, self.specs, seed=1, random_b=True)
        self.adapter_dirs = [self.tmp / f"adapter_r{r}" for r in self.p.ranks]
        for i, path in enumerate(self.adapter_dirs):
            lgeo_jax.save_adapter(random, path, index=i)
        self.adapters = lgeo_jax.concat_adapters([lgeo_jax.load_adapter(d) for d in self.adapter_dirs])
        self.peft, self.names = ref_extract.load_peft_model(self.base_dir, self.adapter_dirs, dtype=self.torch_dtype,
                                                            device=self.p.torch_device)
        self._built = True

    def token_ids(self, batch: int, seq: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.cfg.vocab_size, (batch, seq)).astype(np.int32)

    def lora_flops(self, n_layers: int) -> float:
        """Every adapter's low-rank FLOPs per token, summed (true ranks, not the padded ones we execute)."""
        dims = target_dims(self.cfg)
        return sum(lora_flops_per_token(dims, r, TARGETS, n_layers) for r in self.p.ranks)


# ---- stages --------------------------------------------------------------------------------------

def stage_extract(ctx: Context) -> list[dict]:
    """Base + 4 adapters: ours in one jitted pass, the reference one PEFT pass per adapter."""
    ctx.build()
    (b, t), layers = ctx.p.extract_batch, ctx.p.layers
    ids = ctx.token_ids(b, t, seed=10)
    out = {}

    def ours():
        out["jax"] = jax.block_until_ready(lgeo_jax.residuals(ctx.model, ids, layers=layers, adapters=ctx.adapters))

    def ref():
        out["ref"] = ref_extract.residuals(ctx.peft, ctx.names, ids, layers, batch_size=b)

    times = take_turns({"jax": wall(ours), "ref": wall(ref)}, repeats=ctx.p.repeats)
    h_jax, h_ref = np.asarray(out["jax"]), out["ref"]  # [1 + A, C, B, T, D]
    n_run, passes = max(layers) + 1, 1 + len(ctx.p.ranks)
    flops = b * t * (passes * forward_flops_per_token(ctx.cfg, t, n_run) + ctx.lora_flops(n_run))
    checks = [
        # Two float32 implementations of the same forward differ by rounding only (1.5e-6 of ||h|| measured
        # over the cpu profile's 8 blocks). bf16 streams round each block output to 2^-9, which no
        # tolerance below ~1e-2 survives.
        check("residuals: max over models/layers of ||h_jax - h_ref|| / ||h_ref||",
              max(rel_err(h_jax[a, c], h_ref[a, c]) for a in range(passes) for c in range(len(layers))),
              _tol(ctx, 1e-5, 2e-2)),
        # A delta is the difference of two such residuals, so its error is at most twice theirs, in units
        # of ||h_base|| (relative to the delta itself it grows as ||h|| / ||delta||).
        check("deltas h_adapter - h_base: max over adapters/layers of ||d_jax - d_ref|| / ||h_base||",
              max(_delta_err(h_jax, h_ref, a, c) for a in range(1, passes) for c in range(len(layers))),
              _tol(ctx, 2e-5, 4e-2)),
    ]
    return [row("extract", times["jax"], times["ref"], b * t * passes, "token-passes/s", checks,
                reference="transformers + PEFT, one pass per adapter (hooks, inference_mode)", ref_kind="torch",
                flops=flops, shape=f"batch {b} x {t}, {len(layers)} of {ctx.cfg.n_layers} layers captured, "
                                   f"base + ranks {list(ctx.p.ranks)}")]


def _delta_err(h_jax: np.ndarray, h_ref: np.ndarray, a: int, c: int) -> float:
    d_jax, d_ref = h_jax[a, c] - h_jax[0, c], h_ref[a, c] - h_ref[0, c]
    return float(np.linalg.norm(d_jax - d_ref) / np.linalg.norm(h_ref[0, c]))


def _tol(ctx: Context, float32: float, bfloat16: float) -> float:
    return float32 if ctx.p.dtype == "float32" else bfloat16


def stage_lora_train(ctx: Context) -> list[dict]:
    """LoRA training of the 4 ranks: ours stacked in one jitted step, the reference one PEFT run per rank.

    Both start from identical factors (our init written as PEFT directories) and see the same batch every
    step (one batch per epoch: the loss, a mean over the batch's target tokens, ignores row order).
    """
    ctx.build()
    (b, t), steps = ctx.p.train_batch, ctx.p.train_steps
    ids = ctx.token_ids(b, t, seed=11)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, t // 2:] = 1  # the "response" half is the target
    examples = [TokenizedExample(ids[i], loss_mask[i], i, False) for i in range(b)]
    init = lgeo_jax.init_adapters(ctx.cfg, ctx.specs, seed=2)  # B = 0, as PEFT's init
    init_dirs = [ctx.tmp / f"train_init_r{r}" for r in ctx.p.ranks]
    for i, path in enumerate(init_dirs):
        lgeo_jax.save_adapter(init, path, index=i)
    lr, clip = 1e-3, 1.0
    train_cfg = TrainConfig(lr=lr, warmup_steps=0, warmup_fraction=None, schedule="linear", max_grad_norm=clip,
                            batch_size=b, grad_accum_steps=1, epochs=steps, compute_dtype=ctx.p.dtype, seed=0)
    # float32 factors on both sides; with a bf16 profile both compute in bf16 (ours casts the base once,
    # torch autocasts), as our trainer keeps float32 master weights.
    settings = ref_train.LoraSettings(lr=lr, alpha_over_rank=2.0, schedule="linear", max_grad_norm=clip,
                                      dtype=torch.float32, autocast_bf16=ctx.p.dtype == "bfloat16",
                                      device=ctx.p.torch_device)
    n = len(ctx.p.ranks)
    out = {}

    def ours() -> float:
        out["jax"] = res = train_lora(ctx.model, init, examples, train_cfg, length_buckets=1, progress=False)
        return b * t * n / res.tokens_per_second()  # seconds per step of all ranks, compile step excluded

    def ref() -> float:
        out["ref"] = runs = ref_train.train_ranks(ctx.base_dir, ctx.p.ranks, ids[None], loss_mask[None], steps,
                                                  settings=settings, init_dirs=init_dirs)
        return sum(float(run.step_seconds[1:].mean()) for run in runs)  # first step excluded, as ours

    # No warm-up round: each side's timer already excludes its first (compiling / allocating) step.
    times = take_turns({"jax": ours, "ref": ref}, repeats=ctx.p.repeats, warmup=0)
    ref_losses = np.stack([run.losses for run in out["ref"]], axis=1)  # [steps, A]
    trained = []
    for run, path in zip(out["ref"], init_dirs, strict=True):  # read back through our PEFT loader
        run.model.save_pretrained(path.with_name(path.name + "_trained"))
        trained.append(lgeo_jax.load_adapter(path.with_name(path.name + "_trained")))
    ref_adapters = lgeo_jax.concat_adapters(trained)
    b_err = max(rel_err(out["jax"].adapters.factors(tg)[1], ref_adapters.factors(tg)[1]) for tg in TARGETS)
    n_layers = ctx.cfg.n_layers
    per_token = (2 * forward_flops_per_token(ctx.cfg, t, n_layers, lm_head=True)  # forward + activation grads
                 + 4 * t * ctx.cfg.n_heads * ctx.cfg.head_dim * n_layers)  # attention backward: 4 score matmuls
    flops = b * t * (n * per_token + 3 * ctx.lora_flops(n_layers))
    checks = [
        # Same float32 math from the same start: the per-step losses differ by rounding (6e-7 measured).
        check("per-step training loss, max relative difference", np.max(np.abs(out["jax"].losses / ref_losses - 1)),
              _tol(ctx, 1e-5, 2e-2)),
        # B starts at 0, so Adam's first steps move each element by ~lr * sign(g): elements whose gradient
        # is rounding noise may take the other sign on the other side. Those are few: the trained B factors
        # differ by ~1e-4 (measured at the cpu profile's shapes), while a real mismatch (a wrong scale, target,
        # schedule or clipping) moves them by O(0.1).
        check("trained B factors: max over targets of ||B_jax - B_ref|| / ||B_ref||", b_err, _tol(ctx, 2e-3, 1e-1)),
    ]
    return [row("lora_train", times["jax"], times["ref"], b * t * n, "adapter-tokens/s", checks,
                reference="transformers + PEFT, plain loop, one rank after another (fused AdamW)", ref_kind="torch",
                flops=flops, shape=f"batch {b} x {t}, ranks {list(ctx.p.ranks)} on q/k/v/o, AdamW, clip {clip}")]


class _MemoryLog:
    """The progress log `extract_corpus` asks for (a stage manifest in the pipeline), kept in memory."""

    def __init__(self):
        self.progress = {}

    def update(self, **entries):
        self.progress = {**self.progress, **entries}


def stage_corpus(ctx: Context) -> list[dict]:
    """Corpus write (extraction into the store, end to end) and one shuffled epoch of SAE batches read back.

    Ours: `extract_corpus` into tensorstore zarr3, `CorpusSource`; reference: reference extraction, deltas
    in float32, one bf16 numpy memmap per (array, layer) written with fsync, `shuffled_batches` per file.
    Write-only timing would need the package's private store API (`lgeo_jax.corpus._store`), so the write
    row includes the extraction; compare it with the extract row.
    """
    ctx.build()
    (n_ex, t), layers = ctx.p.corpus_examples, ctx.p.layers
    ids = ctx.token_ids(n_ex, t, seed=12)
    examples = [TokenizedExample(ids[i], np.ones(t, np.int32), i, False) for i in range(n_ex)]
    # Every token is kept (BOS too), so reference row i * T + position is token (i, position) and the
    # row count is a multiple of the read batch: one epoch serves every row once on both sides.
    settings = ExtractConfig(layers=layers, splits=("probe",), exclude_bos=False, batch_size=ctx.p.corpus_batch,
                             chunk_rows=min(1024, n_ex * t))
    names = tuple(s.name for s in ctx.specs)
    arrays = [("base", layer) for layer in layers] + [(a, layer) for a in names for layer in layers]
    # The reference's file for arrays[i]: model a (0 = base) at layer slot c, in the same order.
    ref_files = [f"{a}_{c}.bin" for a in range(1 + len(names)) for c in range(len(layers))]
    counter = itertools.count()
    out = {}

    def ours_write():
        store = ctx.tmp / f"corpus_jax_{next(counter)}"
        extract_corpus(ctx.model, [ctx.adapters], names, {"probe": examples}, {"probe": [0] * n_ex}, str(store),
                       settings, _MemoryLog())
        out["jax"] = store

    def ref_write():
        folder = ctx.tmp / f"corpus_ref_{next(counter)}"
        folder.mkdir()
        h = ref_extract.residuals(ctx.peft, ctx.names, ids, layers, batch_size=ctx.p.corpus_batch)
        values = np.concatenate([h[:1], ref_extract.deltas(h)])  # [1 + A, C, N, T, D]: base, deltas
        d = values.shape[-1]
        for name, rows in zip(ref_files, values.reshape(len(ref_files), -1, d), strict=True):  # [N * T, D] each
            batches = (rows[i:i + ctx.p.corpus_batch * t] for i in range(0, len(rows), ctx.p.corpus_batch * t))
            ref_corpus.write_rows(folder / name, batches, len(rows), d)
        out["ref"] = folder

    times_w = take_turns({"jax": wall(ours_write), "ref": wall(ref_write)}, repeats=ctx.p.repeats)
    corpus = open_corpus(out["jax"])
    meta = corpus.meta("probe")
    where = meta["sample_index"] * t + meta["position"]  # our row r holds reference row where[r]
    d = ctx.cfg.d_model
    ref_rows = [ref_corpus.to_float32(np.asarray(ref_corpus.open_rows(out["ref"] / f, d)))[where] for f in ref_files]
    write_err = max(rel_err(corpus.split_rows("probe", name, layer), ref)
                    for (name, layer), ref in zip(arrays, ref_rows, strict=True))
    n_rows, n_arr = n_ex * t, len(arrays)
    nbytes = n_rows * n_arr * d * 2

    delta_arrays = arrays[len(layers):]  # what SAE training reads

    def ours_read():
        served = []
        with CorpusSource(corpus, "probe", delta_arrays, seed=0) as source:
            steps = n_rows // ctx.p.read_batch
            for step in range(ctx.p.read_epochs * steps):
                batch = source.batch(step, ctx.p.read_batch)  # [S, b, D]
                served.append(batch)
        out["jax_read"] = served[:steps]

    def ref_read():
        served = []
        files = [out["ref"] / f for f in ref_files[len(layers):]]
        for epoch in range(ctx.p.read_epochs):
            streams = [ref_corpus.shuffled_batches(f, d, ctx.p.read_batch, seed=epoch) for f in files]
            served.extend(np.stack(batch) for batch in zip(*streams, strict=True))  # [S, b, D]
        out["ref_read"] = served[:n_rows // ctx.p.read_batch]

    times_r = take_turns({"jax": wall(ours_read), "ref": wall(ref_read)}, repeats=ctx.p.repeats)
    read_checks = _read_checks(corpus, delta_arrays, out["jax_read"], out["ref_read"], ref_rows[len(layers):])
    shape = f"{n_ex} x {t} tokens, {n_arr} arrays of d {d} (bf16)"
    bf16 = 2.0**-8  # two roundings to bf16 of values that differ by far less: at most 1 ulp (2^-8 relative)
    return [
        row("corpus_write", times_w["jax"], times_w["ref"], n_rows, "tokens/s",
            [check("stored rows: max over arrays of ||ours - ref|| / ||ref|| (bf16)", write_err, bf16)],
            reference="reference extraction + numpy memmap (bf16, fsync)", ref_kind="torch",
            shape=f"{shape}, {nbytes / 1e6:.0f} MB written, extraction included"),
        row("corpus_read", times_r["jax"], times_r["ref"], ctx.p.read_epochs * n_rows * len(delta_arrays) / 1e6,
            "M rows/s", read_checks, reference="numpy memmap, chunk + in-buffer shuffle", ref_kind="torch",
            shape=f"{len(delta_arrays)} delta arrays, batches of {ctx.p.read_batch}, {ctx.p.read_epochs} epochs, "
                  "page cache warm"),
    ]


def _read_checks(corpus, arrays, ours: list, ref: list, ref_rows: list) -> list[dict]:
    """One epoch each: ours serves exactly the stored rows it names, once each; the reference serves a
    permutation of its stored rows; and the two epochs hold the same rows up to the stores' difference."""
    x = np.concatenate([b.x for b in ours], axis=1)  # [S, N, D]
    index = np.concatenate([b.rows for b in ours], axis=1)  # [S, N]
    stored = [corpus.split_rows("probe", name, layer) for name, layer in arrays]
    wrong = sum(int(np.sum(x[s] != stored[s][index[s]])) for s in range(len(arrays)))
    repeats = sum(len(idx) - len(np.unique(idx)) for idx in index)
    # Sorted row norms fingerprint a multiset of rows. Sorting is 1-Lipschitz in the max norm and
    # | ||a|| - ||b|| | <= ||a - b||, so the two sides' fingerprints differ by no more than their rows.
    ref_x = np.concatenate(ref, axis=1)  # [S, N, D]
    norms = lambda rows: np.sort(np.linalg.norm(rows.astype(np.float64), axis=-1))
    not_perm = max(np.max(np.abs(norms(ref_x[s]) - norms(r))) for s, r in enumerate(ref_rows))
    cross = max(np.max(np.abs(norms(x[s]) - norms(ref_x[s]))) / np.max(norms(ref_x[s])) for s in range(len(arrays)))
    return [check("ours: served values differing from the stored rows they name", wrong, 0),
            check("ours: rows served twice in one epoch", repeats, 0),
            check("reference: epoch not a permutation of its stored rows (max sorted row-norm difference)",
                  not_perm, 0),
            # Rows of the two stores differ by at most 2^-8 of their size (the write check's bound).
            check("the two epochs: max sorted row-norm difference / max row norm", cross, 2.0**-8)]


def _sae_data(n_sae: int, n_rows: int, d: int, seed: int = 3) -> np.ndarray:
    """[S, N, D] sparse sums of 8 of 4d random unit atoms (positive weights) plus noise: a real SAE problem."""
    rng = np.random.default_rng(seed)
    x = 0.05 * rng.standard_normal((n_sae, n_rows, d), np.float32)
    for s in range(n_sae):
        atoms = rng.standard_normal((4 * d, d), np.float32)
        atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)
        for _ in range(8):  # one atom per row at a time: memory stays [N, D]
            x[s] += rng.exponential(1.0, (n_rows, 1)).astype(np.float32) * atoms[rng.integers(0, 4 * d, n_rows)]
    return x


def stage_sae(ctx: Context) -> list[dict]:
    """24 SAEs (one per adapter x layer): ours `train_saes` vmapped; torch batched bmm; SAELens one by one.

    Identical init (our `init_params` per seed, b_dec = 0), the same batches in the same order, the same
    RMS scales (ours, estimated by `train_saes`), L1 coefficient and Adam settings; the torch trainer drops
    the decoder gradient's row-parallel part before Adam, as our step does with unit-norm decoder rows.
    """
    (d, f), b, steps = ctx.p.sae, ctx.p.sae_batch, ctx.p.sae_steps
    n_sae = len(ctx.p.ranks) * len(ctx.p.layers)
    source = ArraySource(list(_sae_data(n_sae, steps * b, d)), seed=0)
    lr, l1 = 1e-4, 0.15
    sae_cfg = SAEConfig(d, f)
    train_cfg = SAETrainConfig(width=f, steps=steps, batch_size=b, lr=lr, l1=l1, b_dec_init="zeros",
                               scale_batches=min(steps, 4), eval_rows=0, log_every=steps, eval_every=steps,
                               checkpoint_every=steps, base_saes=False)
    bf16_cfg = dataclasses.replace(train_cfg, matmul_dtype="bfloat16")  # the same job with bf16 matmuls
    seeds, l1s = list(range(n_sae)), [l1] * n_sae
    counter = itertools.count()
    run = lambda cfg=train_cfg, **kw: train_saes(source, sae_cfg, cfg, l1s, seeds, ctx.tmp / f"sae_{next(counter)}",
                                                 progress=False, plot=False, **kw)
    first = run(stop_after=1)  # compiles the step; its metrics are the losses at init
    run(bf16_cfg, stop_after=1)  # compiles the bf16 step
    scales = np.asarray([s.scale for s in first.saes], np.float32)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    init = {k: np.asarray(v) for k, v in jax.vmap(lambda key: init_params(key, sae_cfg))(keys).items()}
    x = np.concatenate([source.batch(step, b).x for step in range(steps)], axis=1)  # [S, steps * B, D]
    kw = dict(steps=steps, batch_size=b, l1=l1, lr=lr, params=init, scales=scales, device=ctx.p.torch_device)
    out = {}

    def ours(name="jax", cfg=train_cfg) -> float:
        out[name] = res = run(cfg)
        return n_sae * b / res.final_metrics[0]["tokens_per_s"] * steps  # the training loop's own timer

    def ref(name, fn):
        def timed() -> float:
            out[name] = res = fn(x, f, **kw)
            return res.seconds

        return timed

    fns = {"jax": ours, "jax_bf16": functools.partial(ours, "jax_bf16", bf16_cfg),
           "bmm": ref("bmm", functools.partial(ref_sae.train_saes_bmm, remove_parallel_grad=True))}
    if ctx.p.saelens:
        fns["saelens"] = ref("saelens", ref_sae.train_saes_saelens)
    # No warm-up round: ours compiled in `first`; every side times its training loop only.
    times = take_turns(fns, repeats=ctx.p.repeats, warmup=0)
    loss0 = np.asarray([m["loss"] for m in first.final_metrics])
    loss_end = np.asarray([m["loss"] for m in out["jax"].final_metrics])
    w_dec = np.stack([s.params["W_dec"] for s in out["jax"].saes])  # [S, F, D]
    flops = 12 * d * f * n_sae * b * steps
    shape = f"{n_sae} SAEs of {d} x {f}, batch {b}, {steps} steps, Adam lr {lr}, L1 {l1}"
    rows = [row("sae_train", times["jax"], times["bmm"], n_sae * b * steps, "SAE-tokens/s", [
        # Same float32 math on the same batches: the losses differ by rounding (1.2e-6 measured at the cpu
        # profile's shapes; leaving out the row-parallel gradient removal alone costs 3e-4).
        check("final-step loss, max relative difference", np.max(np.abs(loss_end / out["bmm"].losses[:, -1] - 1)),
              _tol(ctx, 2e-5, 2e-2)),
        # Rows agree to ~1e-11 (measured). Adam can flip the sign of an element whose gradient is rounding
        # noise, moving it by 2 lr and its row's cosine by ~(2 lr)^2 / 2 = 2e-8: 1e-7 allows a few per row.
        check("decoder rows: 1 - min over SAEs of the mean cosine to the reference's rows",
              1 - _mean_row_cosine(w_dec, out["bmm"].params["W_dec"]), _tol(ctx, 1e-7, 1e-2))],
        reference="torch, all SAEs in one baddbmm step, fused Adam", ref_kind="torch", flops=flops, shape=shape)]
    loss16 = np.asarray([m["loss"] for m in out["jax_bf16"].final_metrics])
    w16 = np.stack([s.params["W_dec"] for s in out["jax_bf16"].saes])  # [S, F, D]
    rows.append(row("sae_train_bf16", times["jax_bf16"], times["bmm"], n_sae * b * steps, "SAE-tokens/s", [
        # bf16 operands (8-bit mantissas) in every matmul against the float32 reference: the losses and rows
        # differ by that rounding, not by float32 noise; measured at the cpu profile's shapes 9.3e-5 and 8.4e-9
        # (float32: 1.2e-6 and 2e-13), the tolerances are ~10x that
        check("bf16 vs the float32 reference: final-step loss, max relative difference",
              np.max(np.abs(loss16 / out["bmm"].losses[:, -1] - 1)), 1e-3),
        check("bf16 vs the float32 reference: decoder rows, 1 - min over SAEs of the mean cosine",
              1 - _mean_row_cosine(w16, out["bmm"].params["W_dec"]), 1e-7)],
        reference="torch float32, all SAEs in one baddbmm step (the sae_train reference)", ref_kind="torch",
        flops=flops, shape=shape + ", ours with sae.matmul_dtype: bfloat16"))
    if ctx.p.saelens:
        rows.append(row("sae_train_saelens", times["jax"], times["saelens"], n_sae * b * steps, "SAE-tokens/s", [
            # SAELens' own trainer differs by design (decoder-norm L1, no renormalisation, clipping), so
            # only the loss at the shared start is comparable: the same number up to rounding.
            check("loss at init (step 0), max relative difference",
                  np.max(np.abs(loss0 / out["saelens"].losses[:, 0] - 1)), 1e-5)],
            reference="SAELens 6 SAETrainer.step, one SAE after another", ref_kind="torch", flops=flops,
            shape=shape))
    return rows


def _mean_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Min over SAEs of the mean cosine between corresponding rows of a and b [S, F, D]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [S, F]
    return float(cos.mean(axis=1).min())


def _kernel_rows(ctx: Context, stage: str, ours, numpy_call, torch_fn, compare, flops: float | None,
                 shape: str) -> list[dict]:
    """Ours vs numpy (the worker) vs torch in turns; `compare(ours_out, ref_out) -> checks`."""
    out = {}

    def run(name, fn):
        def timed() -> float:
            t0 = time.perf_counter()
            out[name] = fn()
            return time.perf_counter() - t0

        return timed

    def numpy_side() -> float:
        seconds, outputs = numpy_call()
        out["numpy"] = outputs[0] if len(outputs) == 1 else tuple(outputs)
        return seconds

    block = lambda: jax.tree.map(np.asarray, jax.block_until_ready(ours()))
    times = take_turns({"jax": run("jax", block), "numpy": numpy_side, "torch": run("torch", torch_fn)},
                       repeats=ctx.p.repeats)
    return [row(stage, times["jax"], times["numpy"], 1, "pairs/s", compare(out["jax"], out["numpy"]),
                reference="numpy/scipy, OpenBLAS slow-down variables unset", ref_kind="numpy", flops=flops,
                shape=shape),
            row(f"{stage}_torch", times["jax"], times["torch"], 1, "pairs/s", compare(out["jax"], out["torch"]),
                reference="torch (scripts/reference_torch.geometry)", ref_kind="torch", flops=flops, shape=shape)]


def stage_max_cosine(ctx: Context) -> list[dict]:
    m, n, d = ctx.p.max_cosine
    rng = np.random.default_rng(4)
    a = rng.standard_normal((m, d), np.float32)
    b = rng.standard_normal((n, d), np.float32)
    half = min(m, n) // 2  # half of a has a close match in b (cosine ~0.9), the rest only chance ones
    b[:half] = a[rng.permutation(m)[:half]] + 0.5 * rng.standard_normal((half, d), np.float32)
    a[:2], b[-2:] = 0.0, 0.0  # dead latents on both sides
    ctx.worker.put("mc_a", a), ctx.worker.put("mc_b", b)
    a_dev, b_dev = jax.device_put(a), jax.device_put(b)

    def compare(ours, ref) -> list[dict]:
        (best, idx), (ref_best, ref_idx) = ours, ref
        live = np.isfinite(ref_best)
        # float32 dot products of unit vectors in d dims: error ~ sqrt(d) * 2^-24 each (7e-6 at d = 3584).
        tol = 4 * math.sqrt(d) * 2.0**-24
        differ = live & (idx != ref_idx)  # a different winner is fine only if it is as good (a near tie)
        return [check("max |cos_jax - cos_ref| over live rows", np.max(np.abs(best[live] - ref_best[live])), tol),
                check("rows whose winner differs by more than the tolerance",
                      np.sum(np.abs(best[differ] - ref_best[differ]) > tol), 0),
                check("dead rows of a not NaN / -1", np.sum(np.isfinite(best[~live]) | (idx[~live] != -1)), 0)]

    return _kernel_rows(ctx, "max_cosine", lambda: geometry.max_cosine(a_dev, b_dev, return_index=True),
                        lambda: ctx.worker.call("max_cosine", "mc_a", "mc_b"),
                        lambda: ref_geometry.max_cosine(a, b, device=ctx.p.torch_device), compare,
                        2 * m * n * d, f"{m} x {n} x {d}, float32")


def _planted_decoders(m: int, d: int, k: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Two [M, D] decoders whose top-k subspaces are well separated from the rest (a clear singular gap)
    and share k/2 directions at angles from 0.1 to 60 degrees; the other k/2 directions are unrelated."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 2 * k)))  # [D, 2K] orthonormal
    u, extra = q[:, :k].T, q[:, k:].T  # [K, D] each
    theta = np.radians(np.linspace(0.1, 60.0, k // 2))[:, None]
    v = np.concatenate([np.cos(theta) * u[:k // 2] + np.sin(theta) * extra[:k // 2], extra[k // 2:]])  # [K, D]
    make = lambda basis: rng.standard_normal((m, k)) @ basis + 0.1 * rng.standard_normal((m, d))
    return make(u).astype(np.float32), make(v).astype(np.float32)


def stage_principal_angles(ctx: Context) -> list[dict]:
    """Table 10 for one pair: top-k subspaces of two row-normalised decoders, then their principal angles."""
    m, d, k = ctx.p.subspace
    w1, w2 = _planted_decoders(m, d, k)
    ctx.worker.put("pa_w1", w1), ctx.worker.put("pa_w2", w2)
    w1_dev, w2_dev = jax.device_put(w1), jax.device_put(w2)
    pipeline = jax.jit(lambda u, v: geometry.principal_angles(geometry.top_subspace(u, k, row_normalize=True),
                                                              geometry.top_subspace(v, k, row_normalize=True)))
    torch_fn = lambda: ref_geometry.principal_angles(
        *(ref_geometry.top_subspace(w, k, method="gram", device=ctx.p.torch_device) for w in (w1, w2)))

    def compare(ours, ref) -> list[dict]:
        # float32 Gram + eigh: each basis moves by ~eps * s_1^2 / (s_k^2 - s_k+1^2) radians, a few 1e-5
        # degrees with the planted gap (4e-5 measured at 8192 x 2304); QR and the sine branch keep small
        # angles at that accuracy. A wrong subspace (no row normalisation, bottom-k) moves angles by degrees.
        return [check("max |angle_jax - angle_ref| (degrees)", np.max(np.abs(ours - ref)), 1e-3)]

    flops = 2 * 2 * m * d * d  # the two Gram matrices; eigh and the angles are not counted
    return _kernel_rows(ctx, "principal_angles", lambda: pipeline(w1_dev, w2_dev),
                        lambda: ctx.worker.call("subspace_angles", "pa_w1", "pa_w2", k=k), torch_fn, compare, flops,
                        f"two {m} x {d} decoders, top {k}, Gram + eigh, float32 (angles float64 on the reference)")


def stage_cka(ctx: Context) -> list[dict]:
    t, d = ctx.p.cka
    rng = np.random.default_rng(6)
    x = rng.standard_normal((t, d), np.float32) + 300.0  # a residual-stream-like mean, far above the spread
    y = (x[:, ::-1] * 0.5 + rng.standard_normal((t, d), np.float32)).astype(np.float32)
    ctx.worker.put("cka_x", x), ctx.worker.put("cka_y", y)
    x_dev, y_dev = jax.device_put(x), jax.device_put(y)

    def compare(ours, ref) -> list[dict]:
        # float32 centred products (entry errors ~sqrt(T) 2^-24, independent across the D^2 entries, so
        # they average out of the Frobenius sums) with float64 reductions: 1e-9 measured at 8192 x 2304.
        # 1e-6 keeps a 1000x margin and still fails a missing centring or float32 reductions (2e-4 there).
        return [check("|cka_jax - cka_ref|", abs(float(ours) - float(ref)), 1e-6)]

    return _kernel_rows(ctx, "linear_cka", lambda: geometry.linear_cka(x_dev, y_dev),
                        lambda: ctx.worker.call("linear_cka", "cka_x", "cka_y"),
                        lambda: ref_geometry.linear_cka(x, y, dtype=torch.float32, device=ctx.p.torch_device),
                        compare, 6 * t * d * d, f"{t} x {d} vs {t} x {d}, float32, mean 300 x spread")


STAGES = {"extract": stage_extract, "lora_train": stage_lora_train, "corpus": stage_corpus, "sae": stage_sae,
          "max_cosine": stage_max_cosine, "principal_angles": stage_principal_angles, "cka": stage_cka}


# ---- ceilings, report ----------------------------------------------------------------------------

def ceiling_size(quick: bool) -> int:
    return 512 if quick else 2048


def ceilings(ctx: Context) -> dict[str, float]:
    """float32 n^3 matmul GFLOP/s of each side, measured now (JAX, torch, numpy in its worker)."""
    n = ceiling_size(ctx.quick)
    ctx.worker.put("mm", np.random.default_rng(7).standard_normal((n, n), np.float32))
    numpy_s = min(ctx.worker.call("matmul", "mm", "mm")[0] for _ in range(5))
    out = {"jax": jax_matmul_gflops(n), "torch": torch_matmul_gflops(n, device=ctx.p.torch_device),
           "numpy": 2 * n**3 / numpy_s / 1e9}
    if jax.devices()[0].platform != "cpu":
        out["jax_bf16"] = jax_matmul_gflops(4 * n, dtype="bfloat16")
    return out


def add_efficiency(rows: list[dict], ceiling: dict[str, float], device_kind: str, dtype: str) -> None:
    """% of the run's best measured float32 matmul ceiling per side, and MFU against the device's peak."""
    peak = device_peak_tflops(device_kind, dtype)
    for r in rows:
        for side, kind in (("jax", "jax"), ("torch", r["ref_kind"])):
            gflops = r[f"{side}_gflops"]
            r[f"{side}_pct_ceiling"] = None if gflops is None else 100 * gflops / ceiling[kind]
        r["jax_mfu"] = None if peak is None or r["jax_gflops"] is None else r["jax_gflops"] / (peak * 1e3)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def write_markdown(path: pathlib.Path, result: dict) -> None:
    loaded = "" if result["quiet"] else " — NOT a quiet machine (needs < 2.5): every number is measured under load"
    quick = ", quick: smoke-run shapes, numbers meaningless" if result["quick"] else ""
    lines = [f"# lgeo_jax vs the PyTorch reference ({result['profile']} profile{quick})", "",
             f"Machine: {result['machine']}.", f"Command: `{result['command']}`.",
             f"Load average (1/5/15 min) at start {result['load_average']}, at end {result['load_average_end']} on "
             f"{os.cpu_count()} cores{loaded}.",
             f"float32 matmul ceiling ({result['matmul_size']}^3, best of the start and end measurements): "
             + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in result["matmul_ceiling_gflops"].items()) + ".",
             f"numpy ran with {result['numpy_blas_env']} (this process: {result['openblas_env']}).", "",
             "| stage | lgeo_jax | reference | unit | ratio | lgeo_jax GFLOP/s (% ceiling) | reference GFLOP/s "
             "(% ceiling) | agree | reference is | shape |", "|---|---:|---:|---|---:|---:|---:|---|---|---|"]
    for r in result["stages"]:
        eff = lambda side, r=r: ("" if r[f"{side}_gflops"] is None
                                 else f"{_fmt(r[f'{side}_gflops'])} ({r[f'{side}_pct_ceiling']:.0f}%)")
        mfu = f", MFU {100 * r['jax_mfu']:.1f}%" if r.get("jax_mfu") is not None else ""
        agree = "yes" if r["agree"]["ok"] else "**NO**"
        lines.append(f"| {r['stage']} | {_fmt(r['jax'])} | {_fmt(r['torch'])} | {r['unit']} | {r['ratio']:.2f}x | "
                     f"{eff('jax')}{mfu} | {eff('torch')} | {agree} | {r['reference']} | {r['shape']} |")
    lines += ["", "Ratio = lgeo_jax throughput / reference throughput (median of the timed turns). Agreement checks "
              "(value <= tolerance):", ""]
    for r in result["stages"]:
        for c in r["agree"]["checks"]:
            lines.append(f"- {r['stage']}: {c['what']}: {c['value']:.3g} <= {c['tol']:.3g} "
                         f"{'ok' if c['ok'] else '**FAILED**'}")
    path.write_text("\n".join(lines) + "\n")


def run(profile_name: str, out_dir: pathlib.Path, quick: bool, stages: list[str], repeats: int | None = None) -> dict:
    profile = PROFILES[profile_name]
    if quick:
        profile = dataclasses.replace(profile, **QUICK)
    if repeats is not None:
        profile = dataclasses.replace(profile, repeats=repeats)
    out_dir.mkdir(parents=True, exist_ok=True)
    load0 = load_average()
    if load0[0] >= 2.5:
        print(f"warning: load average {load0[0]} >= 2.5: the results are measured under load", file=sys.stderr)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lgeo_bench_"))
    rows, seconds = [], {}
    try:
        with NumpyWorker(str(tmp)) as worker:
            ctx = Context(profile, tmp, worker, quick)
            ceiling0 = ceilings(ctx)
            for name in stages:
                t0 = time.perf_counter()
                new = STAGES[name](ctx)
                seconds[name] = time.perf_counter() - t0
                rows += new
                for r in new:
                    print(f"{r['stage']:22s} jax {_fmt(r['jax']):>12s}  ref {_fmt(r['torch']):>12s} {r['unit']:18s} "
                          f"{r['ratio']:6.2f}x  agree {r['agree']['ok']}  ({seconds[name]:.0f} s)", flush=True)
            ceiling1 = ceilings(ctx)
            ceiling = {k: max(v, ceiling1[k]) for k, v in ceiling0.items()}
            numpy_env = worker.env()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = jax.devices()[0]
    add_efficiency(rows, ceiling, dev.device_kind, profile.dtype)
    result = {"profile": profile_name, "quick": quick, "command": " ".join(sys.argv), "machine": machine(),
              "lgeo_jax": os.path.dirname(lgeo_jax.__file__),  # which checkout was measured
              "device_kind": dev.device_kind, "load_average": load0, "load_average_end": load_average(),
              "quiet": load0[0] < 2.5, "matmul_ceiling_gflops": ceiling, "matmul_size": ceiling_size(quick),
              "numpy_blas_env": numpy_env,
              "openblas_env": {k: os.environ.get(k) for k in numpy_env}, "stage_seconds": seconds,
              "profile_shapes": dataclasses.asdict(profile), "stages": rows}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(out_dir / "results.md", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one turn each: a smoke run")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    parser.add_argument("--repeats", type=int, help="timed turns per side (default: the profile's)")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    result = run(args.profile, args.out, args.quick, stages, args.repeats)
    print(f"wrote {args.out / 'results.json'} and results.md")
    if not all(r["agree"]["ok"] for r in result["stages"]):
        raise SystemExit("some agreement checks failed (see results.md)")


if __name__ == "__main__":
    main()
