"""Micro-batched `residuals`: slices of the batch give the whole-batch pass's values (and transformers + PEFT's);
the micro-batch tuner (`extract.micro_batch_tokens: auto`)."""

import copy

import numpy as np
import peft
import pytest
import torch
from hf_tiny import SPECS, build_hf_model, save_hf_model
from test_model import hf_block_outputs, rel_err

import lgeo_jax
from lgeo_jax.config import ConfigError
from lgeo_jax.corpus import ExtractConfig, open_corpus
from lgeo_jax.lora import (
    AUTO,
    CPU_FUSION_TOKENS,
    batch_shards,
    candidate_micro_batches,
    fastest_micro_batch,
    micro_batch_size,
    tune_micro_batch_tokens,
)

SPEC = SPECS[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("microbatch")
    hf = build_hf_model(SPEC)
    save_hf_model(hf, root / "base")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, SPEC.vocab, size=(5, 7)).astype(np.int32)  # 5 rows: not divisible by 2 or 3
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # right padding on two rows, so slices differ in their masks
    mask[4, 3:] = 0
    paths, refs = [], []
    for seed, r in enumerate((2, 4)):
        torch.manual_seed(200 + seed)
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, r=r,
                              lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"])
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
        pm.save_pretrained(root / f"r{r}")
        paths.append(root / f"r{r}")
        refs.append(hf_block_outputs(pm.base_model.model, ids, mask)[0])
    return dict(root=root, paths=paths, refs=refs, base_ref=hf_block_outputs(hf, ids, mask)[0], ids=ids, mask=mask)


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 5, 8])
def test_micro_batched_equals_whole_batch_and_peft(setup, micro_batch):
    model = lgeo_jax.load_model(setup["root"] / "base")
    adapters = [lgeo_jax.load_adapter(p) for p in setup["paths"]]
    ids, mask = setup["ids"], setup["mask"]
    kw = dict(layers=range(SPEC.layers), adapters=adapters, attention_mask=mask)
    whole = np.asarray(lgeo_jax.residuals(model, ids, **kw))
    micro = np.asarray(lgeo_jax.residuals(model, ids, micro_batch=micro_batch, **kw))
    assert micro.shape == whole.shape == (3, SPEC.layers, 5, 7, SPEC.d_model)
    keep = mask.astype(bool)
    # Same per-row computation at a different batch size: equal up to float32 rounding of the GEMMs' blocking.
    np.testing.assert_allclose(micro[:, :, keep], whole[:, :, keep], rtol=0, atol=1e-5 * np.abs(whole).max())
    for i, ref in enumerate([setup["base_ref"], *setup["refs"]]):
        for layer in range(SPEC.layers):
            assert rel_err(micro[i, layer], ref[layer], mask) <= 1e-5, (i, layer)


def test_micro_batch_size_keeps_calls_under_the_token_budget():
    assert micro_batch_size(16, 256, 5, CPU_FUSION_TOKENS) == 3  # 5 x 3 x 256 = 3,840 <= 4,096 < 5 x 4 x 256
    assert micro_batch_size(1, 32, 5, CPU_FUSION_TOKENS) == 1
    assert micro_batch_size(4, 32, 5, CPU_FUSION_TOKENS) == 4  # the whole batch fits: no slicing
    assert micro_batch_size(4, 2048, 5, CPU_FUSION_TOKENS) == 1  # one sequence over the budget still runs
    assert micro_batch_size(7, 256, 5, None) == 7
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batch_size(4, 256, 5, 0)


def test_bad_micro_batch_is_refused(setup):
    model = lgeo_jax.load_model(setup["root"] / "base")
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        lgeo_jax.residuals(model, setup["ids"], layers=[0], micro_batch=0)


def test_micro_batches_keep_every_batch_shard_busy():
    # 8-way data parallel: each call keeps a multiple of 8 rows, so no slice falls back to a replicated batch
    assert micro_batch_size(64, 256, 5, CPU_FUSION_TOKENS, shards=8) == 24  # 3 rows per device, 3,840 tokens
    assert micro_batch_size(64, 2048, 5, CPU_FUSION_TOKENS, shards=8) == 8  # one row per device even when over
    assert micro_batch_size(16, 256, 5, CPU_FUSION_TOKENS, shards=8) == 16  # never more than the batch
    mesh = lgeo_jax.sharding.make_mesh(data=2, fsdp=2, model=2)
    assert batch_shards(mesh) == 4  # the batch rule splits over data x fsdp, not model


def test_fastest_micro_batch_times_after_the_compile_and_keeps_the_fastest():
    # A fake clock: each call of run(m) advances it by m's cost; the first call of each candidate also pays a
    # "compile" that would win or lose the race if it were timed.
    cost = {1: 5.0, 2: 3.0, 4: 4.0, 8: 6.0}
    compile_cost = {1: 0.0, 2: 100.0, 4: 0.0, 8: 0.0}
    now, calls = [0.0], []

    def run(m):
        now[0] += cost[m] + (compile_cost[m] if m not in calls else 0.0)
        calls.append(m)

    best, seconds = fastest_micro_batch(run, [1, 2, 4, 8], repeats=2, clock=lambda: now[0])
    assert best == 2 and seconds == cost
    assert calls == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8]  # one untimed call, then `repeats` timed ones
    with pytest.raises(ValueError, match="no candidates"):
        fastest_micro_batch(run, [])


def test_micro_batch_candidates_are_shard_multiples_with_the_cliff_and_the_whole_batch():
    assert candidate_micro_batches(16, 256, 5) == (1, 2, 3, 4, 8, 16)  # 3 = the 4,096-token cliff budget
    assert candidate_micro_batches(1, 32, 5) == (1,)
    assert candidate_micro_batches(64, 256, 5, shards=8) == (8, 16, 24, 32, 64)
    assert candidate_micro_batches(5, 2048, 5, shards=8) == (5,)  # fewer rows than shards: the whole batch


@pytest.mark.parametrize("shards", [1, 8])
def test_tuned_token_budget_gives_back_the_fastest_micro_batch(monkeypatch, shards):
    import lgeo_jax.lora._tune as tune

    batch, seq, n_models = 64, 256, 5
    for want in candidate_micro_batches(batch, seq, n_models, shards=shards):
        monkeypatch.setattr(tune, "fastest_micro_batch", lambda run, candidates, repeats, w=want: (w, {w: 1.0}))
        tokens = tune_micro_batch_tokens(lambda m: None, batch, seq, n_models, shards=shards)
        assert micro_batch_size(batch, seq, n_models, tokens, shards=shards) == want
        # a longer batch later in the run gets fewer rows under the same budget, never fewer than one per shard
        assert micro_batch_size(batch, 2 * seq, n_models, tokens, shards=shards) == max(shards, want // 2 // shards
                                                                                        * shards)


def test_micro_batch_tokens_config_accepts_auto_and_refuses_other_words():
    assert ExtractConfig(micro_batch_tokens="auto").micro_batch_tokens == AUTO
    assert ExtractConfig(micro_batch_tokens="2048").micro_batch_tokens == 2048  # YAML numeric strings stay numbers
    assert ExtractConfig(micro_batch_tokens=None).micro_batch_tokens is None
    with pytest.raises(ConfigError, match=r"micro_batch_tokens: expected 'auto' or a value of type int, got 'fast'"):
        ExtractConfig(micro_batch_tokens="fast")
    with pytest.raises(ConfigError, match=r"micro_batch_tokens: expected an integer > 0, got 0"):
        ExtractConfig(micro_batch_tokens=0)


def test_auto_micro_batch_is_tuned_once_and_extracts_the_same_corpus(monkeypatch):
    from test_corpus import LAYERS, NAMES, MemoryLog, examples, tiny

    import lgeo_jax.corpus._writer as writer

    model, adapters = tiny()
    splits = {"probe": examples(11, 0), "heldout": examples(5, 1, index0=500)}
    cats = {s: [0] * len(ex) for s, ex in splits.items()}
    tuned = []

    def spy(run, batch, seq, n_models, **kw):
        tuned.append((batch, seq, n_models))
        return tune_micro_batch_tokens(run, batch, seq, n_models, **kw)

    monkeypatch.setattr(writer, "tune_micro_batch_tokens", spy)
    stores = {}
    for setting in ("auto", None):
        cfg = ExtractConfig(layers=LAYERS, batch_size=4, chunk_rows=7, store_dtype="float32",
                            micro_batch_tokens=setting)
        store = f"memory://auto-{setting}/"
        writer.extract_corpus(model, [adapters], NAMES, splits, cats, store, cfg, MemoryLog())
        stores[setting] = open_corpus(store)
    assert tuned == [(4, 64, 3)]  # once, on the first batch (4 rows padded to 64), base + 2 adapters
    for split in splits:
        for name in ("base", *NAMES):
            for layer in LAYERS:
                auto, whole = (stores[s].split_rows(split, name, layer, dtype=np.float64) for s in ("auto", None))
                np.testing.assert_allclose(auto, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
