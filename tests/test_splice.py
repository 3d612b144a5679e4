"""Splice evaluation: the start-at-block-L entry, the spliced forward against transformers + PEFT with a forward
hook that replaces the residual at layer L, and effect_recovered at its two fixed points (recon = δ, recon = 0)."""

import copy

import numpy as np
import peft
import pytest
import torch
from hf_tiny import SPECS, build_hf_model, save_hf_model
from test_model import hf_block_outputs, padded_batch

import lgeo_jax
from lgeo_jax.lora import Splice, SpliceInput, splice
from lgeo_jax.sae import SAE, SAEConfig

SPEC = SPECS[0]  # 3 layers, GQA, head_dim != d_model / heads
ADAPTERS = {"r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            "r6_mlp": dict(r=6, lora_alpha=3, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("splice")
    hf = build_hf_model(SPEC)
    save_hf_model(hf, root / "base")
    peft_models = {}
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(200 + seed)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                                     lora_dropout=0.0, **kw)).eval()
        with torch.no_grad():  # PEFT's non-default init is small: make every adapter move the logits clearly
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        pm.save_pretrained(root / name)
        peft_models[name] = pm
    ids, mask = padded_batch(SPEC.vocab, np.random.default_rng(1))
    model = lgeo_jax.load_model(root / "base")
    adapters = [lgeo_jax.load_adapter(root / name) for name in ADAPTERS]
    return dict(hf=hf, peft=peft_models, model=model, adapters=adapters, ids=ids, mask=mask)


def random_sae(d, width, seed, scale):
    """A ReLU SAE with every parameter random (biases too), so each term of the reconstruction matters."""
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(0, 0.3, (d, width)), "b_enc": rng.normal(0, 0.1, width),
              "W_dec": rng.normal(0, 0.3, (width, d)), "b_dec": rng.normal(0, 0.1, d)}
    return SAE(SAEConfig(d_in=d, d_sae=width), {k: v.astype(np.float32) for k, v in params.items()}, scale)


def identity_sae(d, scale):
    """relu(x) - relu(-x) = x: a ReLU SAE whose reconstruction is its input (width 2d)."""
    eye = np.eye(d, dtype=np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    return SAE(SAEConfig(d_in=d, d_sae=2 * d), params, scale)


def zero_sae(d, width):
    params = {k: np.zeros(s, np.float32) for k, s in (("W_enc", (d, width)), ("b_enc", (width,)),
                                                       ("W_dec", (width, d)), ("b_dec", (d,)))}
    return SAE(SAEConfig(d_in=d, d_sae=width), params, 1.0)


# ---- an independent reference: numpy float64 SAEs, transformers + PEFT with a forward hook ----------------------
def np_recon(sae, x):
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    z = x / sae.scale - p["b_dec"]  # ReLU SAEs subtract b_dec before encoding (SAELens' convention)
    f = np.maximum(z @ p["W_enc"] + p["b_enc"], 0.0)
    return (f @ p["W_dec"] + p["b_dec"]) * sae.scale


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def hf_log_probs(model, ids, mask, *, layer, replace):
    """Log-probs [B, T, V] float64 of an HF model whose block `layer` outputs `replace` [B, T, D] instead."""
    def hook(module, inputs, output):
        new = torch.as_tensor(replace, dtype=torch.float32)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    finally:
        handle.remove()
    return log_softmax(logits.numpy())


def reference(setup, layer, splices):
    """KL [V, A, B, S] and nll [V, A, B, S], nll_adapted [A, B, S], nll_base [B, S] from transformers + PEFT."""
    ids, mask = setup["ids"], setup["mask"]
    hs_base, logits_base = hf_block_outputs(setup["hf"], ids, mask)  # [L, B, T, D]: pre-final-norm at the last
    h_base, logp_base = hs_base[layer].astype(np.float64), log_softmax(logits_base)
    targets = ids[:, 1:]
    nll = lambda logp: -np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]
    kl, nlls, nll_adapted = [], [], []
    for i, name in enumerate(ADAPTERS):
        pm = setup["peft"][name].base_model.model
        hs, logits_a = hf_block_outputs(pm, ids, mask)
        h_a, logp_a = hs[layer].astype(np.float64), log_softmax(logits_a)
        nll_adapted.append(nll(logp_a))
        kl_i, nll_i = [], []
        for s in splices:
            sae = s.saes if s.saes is None or isinstance(s.saes, SAE) else s.saes[i]
            if sae is None:
                r = h_base
            elif s.on is SpliceInput.DELTA:
                r = h_base + np_recon(sae, h_a - h_base)
            else:
                r = h_base + np_recon(sae, h_a) - np_recon(sae, h_base)
            logp_v = hf_log_probs(pm, ids, mask, layer=layer, replace=r)
            kl_i.append(np.sum(np.exp(logp_a[:, :-1]) * (logp_a[:, :-1] - logp_v[:, :-1]), -1))
            nll_i.append(nll(logp_v))
        kl.append(kl_i)
        nlls.append(nll_i)
    return (np.swapaxes(np.asarray(kl), 0, 1), np.swapaxes(np.asarray(nlls), 0, 1), np.asarray(nll_adapted),
            nll(logp_base))


def _variants(d):
    return [Splice("base_only"),
            Splice("delta_sae", [random_sae(d, 29, 0, 1.7), random_sae(d, 29, 1, 0.6)]),
            Splice("dictionary_difference", random_sae(d, 31, 2, 2.3), on=SpliceInput.DIFFERENCE)]


@pytest.mark.parametrize("layer", [0, 1, SPEC.layers - 1])
def test_spliced_forward_equals_transformers_peft_with_a_hook(setup, layer):
    splices = _variants(SPEC.d_model)
    ours = splice(setup["model"], setup["adapters"], setup["ids"], layer=layer, splices=splices,
                  attention_mask=setup["mask"])
    kl, nll, nll_adapted, nll_base = reference(setup, layer, splices)
    targets = setup["mask"].astype(bool)
    targets = targets[:, 1:] & targets[:, :-1].cumsum(1).astype(bool)  # the default: real tokens after a row's first
    rows, cols = np.nonzero(targets)
    np.testing.assert_array_equal(ours.row, rows)
    ref = {"kl": kl[..., rows, cols], "nll": nll[..., rows, cols], "nll_adapted": nll_adapted[..., rows, cols],
           "nll_base": nll_base[rows, cols]}
    assert ref["kl"][0].min() > 1e-3  # the adapters change the next-token distribution: KL(base only) is not ~0
    for key, want in ref.items():
        got = getattr(ours, key)
        assert got.shape == want.shape, key
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1.0)
        assert err <= 1e-4, (key, err)


def test_start_at_block_l_equals_the_full_forward_when_fed_the_true_residual(setup):
    import jax.numpy as jnp

    model, ids, mask = setup["model"], setup["ids"], setup["mask"]
    x, positions, valid = model.prepare_inputs(jnp.asarray(ids), jnp.asarray(mask), 1, None)
    full, captured = model.run_blocks(x, positions, valid, n_layers=SPEC.layers, capture=range(SPEC.layers))
    want = np.asarray(model.logits(full))
    for layer in range(SPEC.layers):
        rest, _ = model.run_blocks(captured[layer], positions, valid, n_layers=SPEC.layers, start=layer + 1)
        np.testing.assert_allclose(np.asarray(model.logits(rest)), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # and it can fail: starting one block too late skips a block
    late, _ = model.run_blocks(captured[0], positions, valid, n_layers=SPEC.layers, start=2)
    assert np.abs(np.asarray(model.logits(late)) - want).max() > 1e-2 * np.abs(want).max()
    with pytest.raises(ValueError, match="capture"):
        model.run_blocks(x, positions, valid, n_layers=SPEC.layers, capture=(0,), start=1)


def _record(setup, layer, delta, dictionary):
    """Splice the four SPLICES with the given delta SAEs (one per adapter) and dictionary; one record per adapter."""
    from lgeo_jax.analysis import splice_record, splice_sums, splices_for

    tokens = splice(setup["model"], setup["adapters"], setup["ids"], layer=layer,
                    splices=splices_for(delta, dictionary, random_seed=0), attention_mask=setup["mask"])
    sums = splice_sums(tokens, np.arange(len(setup["ids"])), list(ADAPTERS))
    return tokens, {a: splice_record(s, n_boot=200, seed=0, level=0.95) for a, s in sums.items()}


def test_a_perfect_reconstruction_recovers_the_whole_effect_and_a_zero_one_none(setup):
    d = SPEC.d_model
    # recon = δ (identity delta SAE, at a non-trivial scale) and the dictionary difference of an identity dictionary
    tokens, records = _record(setup, 1, [identity_sae(d, 1.9), identity_sae(d, 0.4)], identity_sae(d, 3.1))
    assert np.abs(tokens.kl[1:3]).max() < 1e-5  # KL ~ 0: the adapted model itself
    np.testing.assert_allclose(tokens.nll[1], tokens.nll_adapted, atol=1e-5)
    for r in records.values():
        assert r["kl_base_only"]["value"] > 1e-2
        for name in ("delta_sae", "dictionary_difference"):
            assert abs(r["effect_recovered"][name]["value"] - 1.0) <= 1e-4, name
        assert abs(r["kl_delta_sae"]["value"]) <= 1e-5
        # the identity beats a random-init SAE of its shape, decided by the paired interval
        assert r["effect_recovered"]["delta_sae"]["vs_random"] == 1
        assert r["effect_recovered"]["delta_sae_minus_random_sae"]["ci_low"] > 0
    # recon = 0: exactly the base-only splice
    tokens, records = _record(setup, 1, [zero_sae(d, 7), zero_sae(d, 7)], zero_sae(d, 7))
    np.testing.assert_array_equal(tokens.kl[1], tokens.kl[0])
    for r in records.values():
        for name in ("delta_sae", "dictionary_difference"):
            assert abs(r["effect_recovered"][name]["value"]) <= 1e-6
        assert r["ce"]["base"]["value"] != r["ce"]["adapted"]["value"]


def test_effect_recovered_statistics_against_numpy(setup):
    """The record's numbers are ratios of totals over target tokens; their intervals come from prompt resamples."""
    from lgeo_jax.analysis import splice_metrics, splice_sums, splices_for

    d = SPEC.d_model
    splices = splices_for([random_sae(d, 29, 0, 1.7), random_sae(d, 29, 1, 0.6)], random_sae(d, 31, 2, 2.3),
                          random_seed=0)
    tokens = splice(setup["model"], setup["adapters"], setup["ids"], layer=0, splices=splices,
                    attention_mask=setup["mask"])
    prompts = np.array([7, 3, 7])  # two rows of one prompt: it is one resampling unit
    sums = splice_sums(tokens, prompts, list(ADAPTERS))
    for i, a in enumerate(ADAPTERS):
        m = splice_metrics(sums[a].totals())
        kl = tokens.kl[:, i].astype(np.float64)
        np.testing.assert_allclose(m["effect_recovered.delta_sae"], 1 - kl[1].sum() / kl[0].sum(), rtol=1e-12)
        np.testing.assert_allclose(m["kl_random_sae"], kl[3].mean(), rtol=1e-12)
        np.testing.assert_allclose(m["ce.base"], tokens.nll_base.mean(), rtol=1e-6)
        assert sums[a].n_prompts == 2
    with pytest.raises(ValueError, match="filler rows"):
        splice_sums(tokens, np.array([0, -1, 2]), list(ADAPTERS))


def test_bad_splices_are_refused_naming_them(setup):
    d = SPEC.d_model
    with pytest.raises(ValueError, match="'delta_sae': 1 SAEs for 2 adapters"):
        splice(setup["model"], setup["adapters"], setup["ids"], layer=0,
               splices=[Splice("delta_sae", [random_sae(d, 5, 0, 1.0)])])
    with pytest.raises(ValueError, match="'wide': SAE d_in 7"):
        splice(setup["model"], setup["adapters"], setup["ids"], layer=0,
               splices=[Splice("wide", random_sae(7, 5, 0, 1))])
    with pytest.raises(ValueError, match="out of range"):
        splice(setup["model"], setup["adapters"], setup["ids"], layer=SPEC.layers, splices=[Splice("base_only")])


def test_report_rows_section_and_plot(setup, tmp_path):
    from lgeo_jax.report._splice import splice_plots, splice_rows, splice_section

    d = SPEC.d_model
    _, records = _record(setup, 1, [identity_sae(d, 1.0), random_sae(d, 2 * d, 1, 0.6)], random_sae(d, 31, 2, 2.3))
    block = {"enabled": True, "layers": [1], "adapters": list(ADAPTERS), "ranks": [4, 6], "split": "heldout",
             "n_prompts": 3, "cells": {a: {"L1": r} for a, r in records.items()}}
    rows = splice_rows({"splice": block})
    keys = {(r["adapter"], r["layer"], r["metric"]): r["value"] for r in rows}
    for a in ADAPTERS:
        for metric in ("kl_base_only", "kl_delta_sae", "kl_dictionary_difference", "kl_random_sae",
                       "effect_recovered.delta_sae", "effect_recovered.dictionary_difference",
                       "effect_recovered.random_sae", "ce.adapted", "ce.base", "ce.delta_sae"):
            for suffix in ("", ".ci_low", ".ci_high"):
                assert (a, 1, metric + suffix) in keys, (a, metric + suffix)
        assert keys[(a, 1, "effect_recovered.delta_sae.vs_random")] in (-1, 0, 1)
    assert keys[("r4", 1, "effect_recovered.delta_sae")] == pytest.approx(1.0, abs=1e-4)
    text = splice_section({"splice": block})
    assert "▲" in text and "r6_mlp" in text
    assert splice_section({"splice": {"enabled": False}}).startswith("Splice evaluation is off")
    (name, caption), = splice_plots({"splice": block}, tmp_path, "png")
    assert (tmp_path / name).stat().st_size > 0 and "random-init" in caption
