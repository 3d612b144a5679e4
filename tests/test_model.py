"""Gemma-2 parity with transformers (eager, float32 and bf16) on random tiny checkpoints, plus loader checks."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import SPECS, TinySpec, build_hf_model, save_hf_model

import lgeo_jax
from lgeo_jax.model import Gemma2Config
from lgeo_jax.sharding import make_mesh

SEQ = 13  # longer than every spec's sliding window


def hf_block_outputs(hf, ids, mask=None):
    """HF residuals after every block; the last one captured before the final norm (docs/conventions.md)."""
    captured = {}
    hook = hf.model.layers[-1].register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
                     output_hidden_states=True)
    finally:
        hook.remove()
    hs = [t.float().numpy() for t in out.hidden_states[1:-1]] + [captured["last"].float().numpy()]
    return np.stack(hs), out.logits.float().numpy()


def padded_batch(vocab, rng):
    """Row 0 unpadded, row 1 left-padded by 4, row 2 right-padded by 3."""
    ids = rng.integers(0, vocab, (3, SEQ))
    mask = np.ones((3, SEQ), np.int64)
    mask[1, :4] = 0
    mask[2, -3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def rel_err(ours, ref, valid):
    """max |ours - ref| / max |ref| over non-padded positions."""
    sel = valid.astype(bool)
    return float(np.abs(ours[..., sel, :] - ref[..., sel, :]).max() / np.abs(ref[..., sel, :]).max())


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def checkpoint(request, tmp_path_factory):
    spec = request.param
    hf = build_hf_model(spec)
    path = tmp_path_factory.mktemp(spec.name)
    save_hf_model(hf, path)
    return spec, hf, path


def test_float32_parity_every_layer_with_padding(checkpoint):
    spec, hf, path = checkpoint
    model = lgeo_jax.load_model(path)
    ids, mask = padded_batch(spec.vocab, np.random.default_rng(0))
    ref, ref_logits = hf_block_outputs(hf, ids, mask)
    ours = np.asarray(lgeo_jax.residuals(model, ids, layers=range(spec.layers), attention_mask=mask))
    assert ours.shape == (1, spec.layers, 3, SEQ, spec.d_model) and ours.dtype == np.float32
    for layer in range(spec.layers):
        assert rel_err(ours[0, layer], ref[layer], mask) <= 1e-5, f"layer {layer}"
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[0]
    assert rel_err(logits, ref_logits, mask) <= 1e-5


def test_padding_never_changes_real_tokens(checkpoint):
    spec, _, path = checkpoint
    model = lgeo_jax.load_model(path)
    rng = np.random.default_rng(1)
    seq = rng.integers(1, spec.vocab, (1, 9))
    plain = np.asarray(lgeo_jax.residuals(model, seq, layers=range(spec.layers)))
    left = np.concatenate([np.zeros((1, 4), np.int64), seq], axis=1)
    left_mask = (np.arange(13) >= 4).astype(np.int64)[None]
    right = np.concatenate([seq, np.zeros((1, 4), np.int64)], axis=1)
    right_mask = (np.arange(13) < 9).astype(np.int64)[None]
    got_left = np.asarray(lgeo_jax.residuals(model, left, layers=range(spec.layers), attention_mask=left_mask))
    got_right = np.asarray(lgeo_jax.residuals(model, right, layers=range(spec.layers), attention_mask=right_mask))
    scale = np.abs(plain).max()
    assert np.abs(got_left[..., 4:, :] - plain).max() / scale <= 1e-6
    assert np.abs(got_right[..., :9, :] - plain).max() / scale <= 1e-6


def test_layer_subset_order_and_early_stop(checkpoint):
    spec, _, path = checkpoint
    model = lgeo_jax.load_model(path)
    ids = np.random.default_rng(2).integers(0, spec.vocab, (2, SEQ))
    full = np.asarray(lgeo_jax.residuals(model, ids, layers=range(spec.layers)))
    picked = np.asarray(lgeo_jax.residuals(model, ids, layers=[1, 0]))
    np.testing.assert_array_equal(picked[0, 0], full[0, 1])
    np.testing.assert_array_equal(picked[0, 1], full[0, 0])
    # The layer loop stops after the deepest requested layer, and no LM head ([B, T, V] logits) is computed.
    for layers, trips in (([0], 1), ([1, 0], 2), ([spec.layers - 1], spec.layers)):
        jaxpr = str(jax.make_jaxpr(lambda i, layers=layers: lgeo_jax.residuals(model, i, layers=layers))(ids))
        assert re.findall(r"length=(\d+)", jaxpr) == [str(trips)]
        assert f"[2,{SEQ},{spec.vocab}]" not in jaxpr


def test_bf16_matches_hf_bf16_as_well_as_hf_matches_float32(checkpoint, tmp_path):
    """bf16 has an 8-bit mantissa (eps 2^-8 = 0.0039); two bf16 implementations differ by rounding order.

    The justified bound: our bf16 residuals are no further from the float32 truth than HF's own bf16
    residuals are (within a factor 2), and both stay within 5% of the largest activation.
    """
    spec, hf, _ = checkpoint
    ids, mask = padded_batch(spec.vocab, np.random.default_rng(3))
    truth, _ = hf_block_outputs(hf, ids, mask)
    hf16 = build_hf_model(spec).to(torch.bfloat16)
    save_hf_model(hf16, tmp_path, dtype=torch.bfloat16)
    hf16_out, _ = hf_block_outputs(hf16, ids, mask)
    model = lgeo_jax.load_model(tmp_path)
    assert model.embed[...].dtype == jnp.bfloat16
    ours = np.asarray(lgeo_jax.residuals(model, ids, layers=range(spec.layers), attention_mask=mask))[0]
    for layer in range(spec.layers):
        e_ours, e_hf = rel_err(ours[layer], truth[layer], mask), rel_err(hf16_out[layer], truth[layer], mask)
        assert e_ours <= max(2 * e_hf, 2**-8), (layer, e_ours, e_hf)
        assert rel_err(ours[layer], hf16_out[layer], mask) <= 0.05
    # float32 activations over bf16 weights: closer to the float32 truth than the all-bf16 path.
    f32_act = np.asarray(lgeo_jax.residuals(model, ids, layers=range(spec.layers), attention_mask=mask,
                                            dtype=jnp.float32))[0]
    assert rel_err(f32_act[-1], truth[-1], mask) < rel_err(ours[-1], truth[-1], mask)


def test_sharded_checkpoint_loads_onto_a_mesh(tmp_path):
    spec = TinySpec("sharded", d_model=64, heads=4, kv_heads=2, head_dim=16, mlp=128, layers=2, vocab=128)
    hf = build_hf_model(spec)
    save_hf_model(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    mesh = make_mesh(data=2, fsdp=2, model=2)
    model = lgeo_jax.load_model(tmp_path, mesh=mesh)
    assert model.blocks.mlp.gate[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
    assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
    ids = np.random.default_rng(4).integers(0, spec.vocab, (2, 11))
    ref, _ = hf_block_outputs(hf, ids)
    ours = np.asarray(lgeo_jax.residuals(model, ids, layers=[0, 1]))[0]
    assert rel_err(ours, ref, np.ones((2, 11))) <= 1e-5


def test_presets_count_parameters_without_allocating():
    from lgeo_jax.model import abstract_model, count_params

    counts = {}
    for name in ("gemma2_2b", "gemma2_9b", "gemma2_27b"):
        abstract = abstract_model(getattr(Gemma2Config, name)())
        leaves = jax.tree.leaves(abstract)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves if hasattr(x, "shape"))
        counts[name] = count_params(abstract)
    assert counts["gemma2_2b"] == 2_614_341_888
    assert counts["gemma2_9b"] == 9_241_705_984


def test_config_round_trips_through_hf(tmp_path):
    for spec in SPECS:
        ours = Gemma2Config.from_hf_config(spec.hf_config().to_dict())
        assert ours.head_dim == spec.head_dim and ours.n_kv_heads == spec.kv_heads
        assert Gemma2Config.from_hf_config(ours.to_hf_config()) == ours
    legacy = SPECS[0].hf_config().to_dict()
    legacy.pop("layer_types")
    legacy.pop("rope_parameters", None)
    legacy["rope_theta"] = 10000.0
    assert Gemma2Config.from_hf_config(legacy).layer_windows()[:2] == (5, 0)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.fixture()
def good_dir(tmp_path):
    save_hf_model(build_hf_model(SPECS[0]), tmp_path)
    return tmp_path


def _tamper_tensor(path, name, new_shape):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    if new_shape is None:
        del tensors[name]
    else:
        tensors[name] = np.zeros(new_shape, np.float32)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("case, match", [
    ("missing_tensor", r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"),
    ("wrong_shape", r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape"),
    ("wrong_architecture", r"config\.json: model_type is 'llama'"),
    ("truncated", r"model\.safetensors: truncated safetensors file"),
    ("missing_config", r"config\.json: missing"),
    ("no_weights", r"no model\.safetensors or model\.safetensors\.index\.json"),
    ("nan", r"tensor 'model\.embed_tokens\.weight' contains NaN"),
])
def test_bad_checkpoints_name_file_and_tensor(good_dir, case, match):
    if case == "missing_tensor":
        _tamper_tensor(good_dir, "model.layers.1.mlp.up_proj.weight", None)
    elif case == "wrong_shape":
        _tamper_tensor(good_dir, "model.layers.0.self_attn.q_proj.weight", (3, 3))
    elif case == "wrong_architecture":
        cfg = json.loads((good_dir / "config.json").read_text())
        cfg["model_type"] = "llama"
        (good_dir / "config.json").write_text(json.dumps(cfg))
    elif case == "truncated":
        f = good_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[: os.path.getsize(f) - 100])
    elif case == "missing_config":
        (good_dir / "config.json").unlink()
    elif case == "no_weights":
        (good_dir / "model.safetensors").unlink()
    elif case == "nan":
        from safetensors.numpy import load_file, save_file

        t = load_file(good_dir / "model.safetensors")
        t["model.embed_tokens.weight"][3, 2] = np.nan
        save_file(t, good_dir / "model.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        lgeo_jax.load_model(good_dir)


@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", [2], r"field 'num_hidden_layers': expected an integer, got \[2\]"),
    ("hidden_size", "big", r"field 'hidden_size': expected an integer, got 'big'"),
    ("vocab_size", True, r"field 'vocab_size': expected an integer, got true"),
    ("head_dim", 7, r"field 'head_dim': must be even for RoPE, got 7"),
    ("layer_types", 3, r"field 'layer_types': expected a list, got 3"),
    ("layer_types", ["sliding_attention", "dense"], r"field 'layer_types\[1\]': expected one of"),
    ("rms_norm_eps", {"eps": 1}, r"field 'rms_norm_eps': expected a number"),
    ("rope_parameters", [10000], r"rope_parameters is \[10000\], expected an object"),
    ("num_key_value_heads", 4, r"field 'num_key_value_heads': must divide n_heads"),
])
def test_config_json_of_the_wrong_types_names_file_and_field(good_dir, field, value, match):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg[field] = value
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{good_dir / 'config.json'}: .*{match}"):
        lgeo_jax.load_model(good_dir)


def test_bad_residual_requests(good_dir):
    model = lgeo_jax.load_model(good_dir)
    ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range.*3 layers"):
        lgeo_jax.residuals(model, ids, layers=[0, 3])
    with pytest.raises(ValueError, match="duplicates"):
        lgeo_jax.residuals(model, ids, layers=[1, 1])
    with pytest.raises(ValueError, match="attention_mask shape"):
        lgeo_jax.residuals(model, ids, layers=[0], attention_mask=np.ones((1, 5)))


def test_remat_gives_the_same_gradients():
    """`remat=True` (recompute each layer in the backward pass, for training memory) changes no number."""
    from flax import nnx

    cfg = Gemma2Config.from_hf_config(SPECS[1].hf_config().to_dict())
    model = lgeo_jax.init_model(cfg, seed=3)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 9))
    graphdef, state = nnx.split(model)

    def grads(remat):
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.asarray(ids), remat=remat) ** 2)
        return jax.tree.leaves(jax.grad(loss)(state))

    for plain, rematted in zip(grads(False), grads(True), strict=True):  # same metric as the parity tests
        plain, rematted = np.asarray(plain), np.asarray(rematted)
        assert np.abs(rematted - plain).max() <= 1e-5 * np.abs(plain).max()
