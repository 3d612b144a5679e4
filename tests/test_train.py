"""LoRA training: loss and optimizer pieces against independent references (numpy, transformers, optax),
gradients against PEFT + torch, training behaviour (loss falls, padding stays zero, exact resume, NaN
stops, stacked = one-by-one), held-out evaluation, pretraining of the built-in base, and bad inputs."""

import copy
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from hf_tiny import SPECS, build_hf_model, save_hf_model
from transformers import AutoTokenizer

import lgeo_jax
from lgeo_jax.data import (
    Batch,
    BatchConfig,
    DataConfig,
    iterate_batches,
    load_alpaca,
    tokenize_split,
    write_synthetic_dataset,
)
from lgeo_jax.lora import AdapterSpec, init_adapters, stacked_lora
from lgeo_jax.model import AttentionType, BuiltinModelConfig
from lgeo_jax.optim import Schedule, lr_schedule
from lgeo_jax.train import (
    NonFiniteLossError,
    TrainCheckpoints,
    TrainConfig,
    clip_per_adapter,
    evaluate_heldout,
    loss_and_grads,
    next_token_loss,
    pretrain_base,
    split_adapters,
    train_lora,
    train_sequential,
)

LAYERS = (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL)
DATA = DataConfig(train=(0, 120), probe=(0, 20), heldout=(120, 160), max_length=80)
# lr high enough that a few steps move the loss; dropout on so the (seed, step) keys are exercised.
TRAIN = TrainConfig(lr=2e-2, warmup_steps=1, warmup_fraction=None, schedule=Schedule.LINEAR, weight_decay=0.01,
                    max_grad_norm=1.0, batch_size=8, grad_accum_steps=2, epochs=1, max_steps=6, seed=3,
                    compute_dtype="float32", checkpoint_every=2)
RANKS = (2, 6)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# ---- pieces against independent references --------------------------------------------------------


def test_next_token_loss_matches_float64_loops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, size=(3, 7))
    mask = rng.integers(0, 2, size=(3, 7))
    mask[:, 0] = 1  # position 0 is never a target, even when marked
    want = np.zeros(2)
    for a in range(2):
        total, count = 0.0, 0
        for b in range(3):
            for t in range(1, 7):
                if mask[b, t]:
                    z = logits[a, b, t - 1].astype(np.float64)
                    total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[b, t]]
                    count += 1
        want[a] = total / count
    got = next_token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("schedule,hf_name", [(Schedule.LINEAR, "linear"), (Schedule.COSINE, "cosine"),
                                              (Schedule.CONSTANT, "constant_with_warmup")])
def test_lr_schedule_matches_transformers(schedule, hf_name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    hf = transformers.get_scheduler(hf_name, opt, num_warmup_steps=7, num_training_steps=50)
    ours = lr_schedule(3e-4, schedule, 7, 50)
    want = [3e-4 * hf.lr_lambdas[0](s) for s in range(51)]  # past the end HF cosine wraps
    np.testing.assert_allclose([float(ours(s)) for s in range(51)], want, rtol=1e-5, atol=1e-12)


def test_clip_per_adapter_is_optax_clip_on_each_adapter():
    rng = np.random.default_rng(1)
    grads = {"q": {"a": rng.normal(size=(2, 3, 5, 4)), "b": rng.normal(size=(2, 3, 4, 6)) * 0.01},
             "v": {"a": rng.normal(size=(2, 3, 5, 4)) * 0.01, "b": rng.normal(size=(2, 3, 4, 2)) * 0.01}}
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32).at[:, 2].multiply(1e-3), grads)
    clipped, _ = clip_per_adapter(1.0).update(grads, None)
    for i in range(3):  # adapters 0 and 1 above the limit (clipped), 2 below it (unchanged)
        one = jax.tree.map(lambda g, i=i: g[:, i], grads)
        want, _ = optax.clip_by_global_norm(1.0).update(one, optax.EmptyState())
        assert (optax.global_norm(one) < 1.0) == (i == 2)
        for got_leaf, want_leaf in zip(jax.tree.leaves(jax.tree.map(lambda g, i=i: g[:, i], clipped)),
                                       jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-6)


# ---- gradients against PEFT + torch -----------------------------------------------------------------


def test_lora_gradients_match_peft(tmp_path):
    spec = SPECS[0]
    hf = build_hf_model(spec)
    save_hf_model(hf, tmp_path / "base")
    adapters_kw = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                   "b": dict(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                             use_rslora=True)}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, spec.vocab, size=(3, 13))
    attn = np.ones_like(ids)
    attn[1, 9:] = 0  # right padding
    attn[2, 6:] = 0
    loss_mask = attn.copy()
    loss_mask[:, :4] = 0  # response-only targets
    loss_mask[0, 7] = 0
    batch = Batch(ids.astype(np.int32), attn.astype(np.int32), loss_mask.astype(np.int32), np.arange(3))
    peft_grads = {}
    for seed, (name, kw) in enumerate(adapters_kw.items()):
        torch.manual_seed(10 + seed)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                                     lora_dropout=0.0, **kw))
        pm.save_pretrained(tmp_path / name)
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn),
                 labels=torch.tensor(batch.labels.astype(np.int64)))
        out.loss.backward()
        peft_grads[name] = (out.loss.item(), {n: p.grad.numpy().astype(np.float64)
                                              for n, p in pm.named_parameters() if p.requires_grad})
    model = lgeo_jax.load_model(tmp_path / "base")
    stack = lgeo_jax.concat_adapters([lgeo_jax.load_adapter(tmp_path / n, config=model.config)
                                      for n in adapters_kw])
    losses, grads = loss_and_grads(model, stack, batch)
    compared = 0
    for i, (name, (want_loss, want)) in enumerate(peft_grads.items()):
        assert abs(losses[i] - want_loss) < 1e-5 * want_loss
        for key, g in want.items():
            layer = int(key.split(".layers.")[1].split(".")[0])
            proj = re.search(r"\.(\w+)_proj\.lora_", key).group(1)
            r = g.shape[0] if ".lora_A." in key else g.shape[1]
            ours = grads[proj]["a"][layer, i, :, :r].T if ".lora_A." in key else grads[proj]["b"][layer, i, :r, :].T
            assert rel(ours, g) < 1e-4, (name, key, rel(ours, g))
            compared += 1
    assert compared == 2 * spec.layers * 8


# ---- training behaviour on a tiny synthetic setup ------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    ds = write_synthetic_dataset(root, n_records=160, seed=0, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(str(ds.tokenizer_dir))
    records = load_alpaca(ds.records_path)
    train = tokenize_split(records, tok, DATA, "train")
    heldout = tokenize_split(records, tok, DATA, "heldout")
    cfg = lgeo_jax.Gemma2Config(vocab_size=len(tok), d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=48,
                                layer_types=LAYERS, sliding_window=16, query_pre_attn_scalar=16.0)
    return dict(cfg=cfg, train=train, heldout=heldout, model=lgeo_jax.init_model(cfg, seed=1))


def fresh_adapters(cfg, dropout=0.1):
    specs = [AdapterSpec(rank=r, alpha=2 * r, dropout=dropout, name=f"r{r}") for r in RANKS]
    return init_adapters(cfg, specs, seed=5)


def factors(adapters):
    return {t: [np.asarray(x) for x in adapters.factors(t)[:2]] for t in adapters.targets}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt_full")
    result = train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], TRAIN, checkpoint_dir=ckpt,
                        length_buckets=1, progress=False)
    return result, ckpt


def test_training_lowers_loss_and_keeps_padding_zero(trained):
    result, ckpt = trained
    assert result.steps_done == result.total_steps == 6 and result.losses.shape == (6, 2)
    assert np.all(result.losses[-2:].mean(axis=0) < result.losses[0] - 0.05), result.losses
    assert TrainCheckpoints(ckpt).latest_step() == 6
    for t, (a, b) in factors(result.adapters).items():
        assert np.abs(b[:, 0, :2]).max() > 0 and np.abs(b[:, 1]).max() > 0, t  # B moved away from 0
        assert np.all(a[:, 0, :, 2:] == 0) and np.all(b[:, 0, 2:, :] == 0), t  # rank-2 padding exactly 0


def test_resume_after_interruption_is_bitwise_identical(data, trained, tmp_path):
    full, _ = trained
    first = train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], TRAIN,
                       checkpoint_dir=tmp_path, stop_after=3, length_buckets=1, progress=False)
    assert first.steps_done == 3 and TrainCheckpoints(tmp_path).latest_step() == 2  # step 3 was lost
    resumed = train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], TRAIN,
                         checkpoint_dir=tmp_path, length_buckets=1, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps_done == 6
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for t, (a, b) in factors(full.adapters).items():
        ra, rb = factors(resumed.adapters)[t]
        np.testing.assert_array_equal(ra, a)
        np.testing.assert_array_equal(rb, b)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], TRAIN, checkpoint_dir=tmp_path,
               stop_after=2, length_buckets=1, progress=False)
    poisoned = copy.deepcopy(data["model"])
    q = poisoned.blocks.attn.q
    q.set_value(q.get_value().at[1, 0, 0, 0].set(jnp.nan))
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*last good checkpoint is step 2"):
        train_lora(poisoned, fresh_adapters(data["cfg"]), data["train"], TRAIN, checkpoint_dir=tmp_path,
                   length_buckets=1, progress=False)
    assert TrainCheckpoints(tmp_path).latest_step() == 2


@pytest.mark.slow
def test_stacked_training_equals_one_by_one(data):
    train = dataclasses.replace(TRAIN, max_steps=3)
    stack = fresh_adapters(data["cfg"], dropout=0.0)
    together = train_lora(data["model"], stack, data["train"], train, progress=False)
    alone, results = train_sequential(data["model"], stack, data["train"], train, progress=False)
    np.testing.assert_allclose(together.losses, np.concatenate([r.losses for r in results], axis=1), rtol=1e-5)
    for t, (a, b) in factors(together.adapters).items():
        sa, sb = factors(alone)[t]
        assert rel(sa, a) < 1e-5 and rel(sb, b) < 1e-5, t


def test_heldout_eval_matches_separate_passes_and_shows_change(data, trained):
    model, adapters = data["model"], trained[0].adapters
    ev = evaluate_heldout(model, adapters, data["heldout"], batch_size=8)
    ids = [e.input_ids for e in data["heldout"]]
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), np.int32)
    attn = np.zeros_like(input_ids)
    lmask = np.zeros_like(input_ids)
    for i, e in enumerate(data["heldout"]):
        input_ids[i, :e.length], attn[i, :e.length], lmask[i, :e.length] = e.input_ids, 1, e.loss_mask
    forward = jax.jit(lambda lora: model(input_ids, attn, lora=lora))
    base = np.asarray(forward(None), np.float64)[0]  # [B, T, V]; no adapters at all

    def loss(logits):
        z = logits[:, :-1]
        nll = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        nll -= np.take_along_axis(z, input_ids[:, 1:, None], -1)[..., 0]
        return (nll * lmask[:, 1:]).sum() / lmask[:, 1:].sum()

    assert abs(ev.base_loss - loss(base)) < 1e-5 * loss(base)
    for i in range(len(RANKS)):
        one = split_adapters(adapters)[i]  # adapter i alone, its own rank
        logits = np.asarray(forward(stacked_lora(one, with_base=False)), np.float64)[0]
        delta = np.sqrt(((logits - base) ** 2).sum(-1))
        assert abs(ev.adapter_loss[i] - loss(logits)) < 1e-5 * loss(logits)
        assert abs(ev.logit_delta_norm[i] - (delta * attn).sum() / attn.sum()) < 1e-4 * ev.logit_delta_norm[i]
        assert ev.logit_delta_norm[i] > 0.05 and abs(ev.adapter_loss[i] - ev.base_loss) > 1e-3
    untrained = evaluate_heldout(model, fresh_adapters(data["cfg"]), data["heldout"], batch_size=8)
    assert untrained.logit_delta_norm == (0.0, 0.0) and untrained.adapter_loss == (ev.base_loss,) * 2


@pytest.mark.slow
def test_pretraining_lowers_loss_and_saves_a_loadable_checkpoint(data, tmp_path):
    cfg = BuiltinModelConfig(**{**dataclasses.asdict(data["cfg"]), "pretrain_steps": 25, "pretrain_lr": 3e-3,
                                "pretrain_batch_size": 8})
    result = pretrain_base(cfg, data["train"], progress=False)
    assert result.losses.shape == (25,) and result.losses[-5:].mean() < result.losses[:3].mean() - 0.5
    lgeo_jax.save_model(result.model, tmp_path)
    loaded = lgeo_jax.load_model(tmp_path)
    ids = jnp.asarray(data["heldout"][0].input_ids[None])
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(result.model(ids)))


# ---- bad inputs ----------------------------------------------------------------------------------------


def test_bad_inputs_fail_with_clear_messages(data):
    model, adapters = data["model"], fresh_adapters(data["cfg"])
    with pytest.raises(ValueError, match="no examples"):
        train_lora(model, adapters, [], TRAIN, progress=False)
    short = lgeo_jax.init_model(dataclasses.replace(data["cfg"], max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"max_position_embeddings=16; lower data.max_length"):
        train_lora(short, fresh_adapters(short.config), data["train"], TRAIN, progress=False)
    no_targets = [dataclasses.replace(e, loss_mask=np.zeros_like(e.loss_mask)) for e in data["train"]]
    with pytest.raises(ValueError, match="no example has a target token"):
        train_lora(model, adapters, no_targets, TRAIN, progress=False)
    other = lgeo_jax.Gemma2Config(**{**dataclasses.asdict(data["cfg"]), "d_model": 24})
    with pytest.raises(ValueError, match="another model shape"):
        train_lora(model, fresh_adapters(other), data["train"], TRAIN, progress=False)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_masters_and_tracks_float32(data):
    train32 = dataclasses.replace(TRAIN, max_steps=3)
    train16 = dataclasses.replace(train32, compute_dtype="bfloat16")
    r32 = train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], train32, length_buckets=1,
                     progress=False)
    r16 = train_lora(data["model"], fresh_adapters(data["cfg"]), data["train"], train16, length_buckets=1,
                     progress=False)
    assert np.all(np.abs(r16.losses - r32.losses) < 0.02 * r32.losses)
    for t in r16.adapters.targets:
        a, b, _ = r16.adapters.factors(t)
        assert a.dtype == b.dtype == jnp.float32, t
    # Adam's first steps are nearly sign(g), so weights are a poor yardstick; gradients are the real one.
    batch = next(iterate_batches(data["train"], BatchConfig(batch_size=8)))
    _, g32 = loss_and_grads(data["model"], r32.adapters, batch, compute_dtype=jnp.float32)
    _, g16 = loss_and_grads(data["model"], r32.adapters, batch, compute_dtype=jnp.bfloat16)
    for t in g32:
        assert g16[t]["b"].dtype == np.float32 and rel(g16[t]["b"], g32[t]["b"]) < 0.05, t
