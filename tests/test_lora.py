"""Multi-adapter LoRA: parity with transformers + PEFT, PEFT round trips, and bad adapter directories."""

import copy
import dataclasses
import json

import numpy as np
import peft
import pytest
import torch
from hf_tiny import SPECS, build_hf_model, save_hf_model
from test_model import hf_block_outputs, padded_batch, rel_err

import lgeo_jax
from lgeo_jax.lora import AdapterSpec, init_adapters

SPEC = SPECS[0]  # GQA with head_dim != d_model / heads


def peft_config(**kw):
    base = dict(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0)
    base.update(kw)
    return peft.LoraConfig(**base)


# Different ranks, alphas and target sets; rsLoRA; per-module rank/alpha patterns; a subset of layers.
PEFT_ADAPTERS = {
    "r4_qkvo": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8_mlp_rslora": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                          use_rslora=True),
    "r2_patterns": dict(r=2, lora_alpha=3, target_modules=["q_proj", "up_proj", "o_proj"],
                        rank_pattern={"q_proj": 6}, alpha_pattern={"layers.1.self_attn.o_proj": 11},
                        layers_to_transform=[0, 1]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = build_hf_model(SPEC)
    save_hf_model(hf, root / "base")
    paths, refs = {}, {}
    ids, mask = padded_batch(SPEC.vocab, np.random.default_rng(0))
    for seed, (name, kw) in enumerate(PEFT_ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft_config(**kw))
        pm.save_pretrained(root / name)
        refs[name] = hf_block_outputs(pm.base_model.model, ids, mask)[0]
        paths[name] = root / name
    base_ref = hf_block_outputs(hf, ids, mask)[0]
    return dict(hf=hf, root=root, paths=paths, refs=refs, base_ref=base_ref, ids=ids, mask=mask)


def test_many_adapters_one_pass_match_peft(setup):
    model = lgeo_jax.load_model(setup["root"] / "base")
    adapters = [lgeo_jax.load_adapter(p) for p in setup["paths"].values()]
    ids, mask = setup["ids"], setup["mask"]
    out = np.asarray(lgeo_jax.residuals(model, ids, layers=range(SPEC.layers), adapters=adapters,
                                        attention_mask=mask))
    assert out.shape == (1 + len(adapters), SPEC.layers, 3, ids.shape[1], SPEC.d_model)
    for layer in range(SPEC.layers):
        assert rel_err(out[0, layer], setup["base_ref"][layer], mask) <= 1e-5
    for i, name in enumerate(setup["paths"], start=1):
        ref = setup["refs"][name]
        for layer in range(SPEC.layers):
            assert rel_err(out[i, layer], ref[layer], mask) <= 1e-5, (name, layer)
            ref_delta = ref[layer] - setup["base_ref"][layer]
            delta = out[i, layer] - out[0, layer]
            assert np.abs(ref_delta[mask.astype(bool)]).max() > 0
            assert rel_err(delta, ref_delta, mask) <= 1e-4, (name, layer)


def test_stacked_equals_separate_passes(setup):
    model = lgeo_jax.load_model(setup["root"] / "base")
    adapters = [lgeo_jax.load_adapter(p) for p in setup["paths"].values()]
    ids = setup["ids"]
    together = np.asarray(lgeo_jax.residuals(model, ids, layers=[0, 2], adapters=adapters))
    for i, a in enumerate(adapters, start=1):
        alone = np.asarray(lgeo_jax.residuals(model, ids, layers=[0, 2], adapters=[a]))
        np.testing.assert_allclose(together[i], alone[1], rtol=0, atol=1e-5 * np.abs(alone).max())
        np.testing.assert_allclose(together[0], alone[0], rtol=0, atol=1e-6 * np.abs(alone).max())


def test_our_adapter_exports_to_peft(setup, tmp_path):
    cfg = lgeo_jax.Gemma2Config.from_hf_dir(setup["root"] / "base")
    specs = [AdapterSpec(rank=3, alpha=6, name="a"), AdapterSpec(rank=5, alpha=5, targets=("q", "down"), name="b",
                                                                  use_rslora=True)]
    ours = init_adapters(cfg, specs, seed=7, random_b=True)
    model = lgeo_jax.load_model(setup["root"] / "base")
    ids, mask = setup["ids"], setup["mask"]
    out = np.asarray(lgeo_jax.residuals(model, ids, layers=range(SPEC.layers), adapters=ours, attention_mask=mask))
    for i in range(2):
        lgeo_jax.save_adapter(ours, tmp_path / f"ad{i}", index=i)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(setup["hf"]), tmp_path / f"ad{i}")
        ref = hf_block_outputs(pm.base_model.model, ids, mask)[0]
        for layer in range(SPEC.layers):
            assert rel_err(out[1 + i, layer], ref[layer], mask) <= 1e-5
        # and back: PEFT dir -> ours -> the same residuals
        again = lgeo_jax.load_adapter(tmp_path / f"ad{i}")
        out_again = np.asarray(lgeo_jax.residuals(model, ids, layers=range(SPEC.layers), adapters=again,
                                                  attention_mask=mask))
        # Same factors; only the batch composition (1 vs 2 adapters) changes float summation order.
        np.testing.assert_allclose(out_again[1], out[1 + i], rtol=0, atol=1e-6 * np.abs(out).max())


def test_peft_import_export_round_trip(setup, tmp_path):
    src = setup["paths"]["r2_patterns"]
    ours = lgeo_jax.load_adapter(src)
    lgeo_jax.save_adapter(ours, tmp_path)
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "r", "lora_alpha"):
        assert json.loads((tmp_path / "adapter_config.json").read_text())[key] == \
            json.loads((src / "adapter_config.json").read_text())[key]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(setup["hf"]), tmp_path)
    ref = hf_block_outputs(pm.base_model.model, setup["ids"], setup["mask"])[0]
    np.testing.assert_allclose(ref, setup["refs"]["r2_patterns"], rtol=0, atol=0)


def test_trainable_counts_match_peft(setup):
    for name, path in setup["paths"].items():
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(setup["hf"]), path, is_trainable=True)
        trainable, _ = pm.get_nb_trainable_parameters()
        assert lgeo_jax.load_adapter(path).trainable_count() == [trainable], name


# ---- bad input -----------------------------------------------------------------------------------
def _copy_adapter(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(path / "adapter_model.safetensors")
    fn(t)
    save_file(t, path / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.1.self_attn.k_proj.lora_{}.weight"


@pytest.mark.parametrize("case, match", [
    ("missing_key", r"missing key base_model\.model\.model\.layers\.1\.self_attn\.k_proj\.lora_B\.weight"),
    ("unknown_target", r"unknown LoRA target module 'c_attn'"),
    ("rank_mismatch", r"rank mismatch between .*layers\.1\.self_attn\.k_proj\.lora_A\.weight"),
    ("dora", r"field 'use_dora' = True: DoRA is not supported"),
    ("other_type", r"peft_type is 'IA3'"),
    ("extra_tensor", r"unexpected tensor 'base_model\.model\.model\.embed_tokens\.lora_A\.weight'"),
    ("other_model_width", r"LoRA target q_proj: adapter has 3 layers, in 48.*model has 3 layers, in 40"),
    ("other_model_depth", r"adapter 'bad' has 3 layers but the model has 2: .*another model shape"),
])
def test_bad_adapters_name_the_key_or_field(setup, tmp_path, case, match):
    path = _copy_adapter(setup["paths"]["r4_qkvo"], tmp_path / "bad")
    if case == "missing_key":
        _edit_tensors(path, lambda t: t.pop(KEY.format("B")))
    elif case == "unknown_target":
        _edit_config(path, target_modules=["q_proj", "c_attn"])
    elif case == "rank_mismatch":
        _edit_tensors(path, lambda t: t.__setitem__(KEY.format("A"), np.zeros((3, 48), np.float32)))
    elif case == "dora":
        _edit_config(path, use_dora=True)
    elif case == "other_type":
        _edit_config(path, peft_type="IA3")
    elif case == "extra_tensor":
        _edit_tensors(path, lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_A.weight",
                                                    np.zeros((4, 97), np.float32)))
    if case.startswith("other_model"):
        cfg = lgeo_jax.Gemma2Config.from_hf_config(SPECS[1].hf_config().to_dict())  # d_model 40
        n_layers = 3 if case == "other_model_width" else 2
        small = lgeo_jax.init_model(dataclasses.replace(cfg, layer_types=cfg.layer_types[:n_layers], n_layers=n_layers))
        with pytest.raises(ValueError, match=match):
            lgeo_jax.residuals(small, np.zeros((1, 3), np.int32), layers=[0],
                               adapters=[lgeo_jax.load_adapter(path)])
        return
    with pytest.raises(ValueError, match=match):
        lgeo_jax.load_adapter(path)
