"""Micro-batched `residuals`: slices of the batch give the whole-batch pass's values (and transformers + PEFT's)."""

import copy

import numpy as np
import peft
import pytest
import torch
from hf_tiny import SPECS, build_hf_model, save_hf_model
from test_model import hf_block_outputs, rel_err

import lgeo_jax
from lgeo_jax.lora import CPU_FUSION_TOKENS, batch_shards, micro_batch_size

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
