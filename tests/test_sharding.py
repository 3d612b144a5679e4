"""Sharding: the `mesh` section, the logical-axis table, where weights, LoRA factors, optimizer state and
activations are placed, and that every mesh layout computes what one device computes.

Equivalence tolerances (float32 throughout). A layout only changes the order in which XLA adds partial
sums: a contraction split over `fsdp` (D) or `model` (heads, MLP width) adds per-device partial sums, and the
batch split over `data` x `fsdp` adds per-device gradient sums. Reordering a float32 sum of n terms moves it
by at most about n * 2^-24 of the sum of |terms|; our longest contraction has 48 terms, chained about six
times per block over two blocks, so a worst case near 3e-5 relative and a typical one (random signs) far
below: measured on the three meshes, residuals differ by <= 8e-7 of the largest |h|, losses by 1e-7,
gradients and the factors after 3 AdamW steps by <= 9e-7 (norm-relative), held-out losses by 6e-8. The
bounds below sit about 6-15x above the measured values and far below what any real layout bug gives (a
missing all-reduce or a misplaced shard is an O(1) error).
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lgeo_jax
from lgeo_jax.config import ConfigError, from_dict, section_hash
from lgeo_jax.data import Batch, TokenizedExample
from lgeo_jax.lora import AdapterSpec, init_adapters, load_adapter, prepare_adapters, save_adapter
from lgeo_jax.model import AttentionType, BuiltinModelConfig
from lgeo_jax.optim import Schedule
from lgeo_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh, mesh_context, place, put
from lgeo_jax.train import (
    TrainCheckpoints,
    TrainConfig,
    evaluate_heldout,
    init_on_mesh,
    lora_optimizer,
    loss_and_grads,
    pretrain_base,
    train_lora,
)

GIB = 2**30
# Divisible where sharding should happen (d 32 by fsdp 4, 4 q / 2 kv heads and MLP 48 by model 2); the
# vocabulary (97, prime) divides nothing, so the embedding and logits show the replication fallback.
CFG = lgeo_jax.Gemma2Config(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                            layer_types=(AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL), sliding_window=8,
                            query_pre_attn_scalar=8.0)
SPECS = [AdapterSpec(rank=r, alpha=2 * r, dropout=0.1, name=f"r{r}") for r in (2, 6)]
TRAIN = TrainConfig(lr=2e-2, warmup_steps=1, warmup_fraction=None, schedule=Schedule.LINEAR, weight_decay=0.01,
                    max_grad_norm=1.0, batch_size=8, grad_accum_steps=1, epochs=1, max_steps=3, seed=3,
                    compute_dtype="float32", checkpoint_every=1)
MESHES = {"data8": (8, 1, 1), "fsdp4_model2": (1, 4, 2), "data2_fsdp2_model2": (2, 2, 2)}
FAST = "data2_fsdp2_model2"  # every mesh axis at once: the default set runs this one, `-m slow` the others
MESH_PARAMS = [pytest.param(name, marks=() if name == FAST else pytest.mark.slow) for name in MESHES]

# Where the rules put each array on a mesh with fsdp > 1 and model > 1 (stacked weights lead with the layer
# axis, LoRA factors with layer and adapter axes); with data alone everything is replicated.
WEIGHTS = {
    ("embed",): P(None, "fsdp"),  # vocab 97 does not divide by model = 2: replicated on that axis
    ("final_norm", "scale"): P("fsdp"),
    ("blocks", "pre_attn_norm", "scale"): P(None, "fsdp"),
    ("blocks", "attn", "q"): P(None, "fsdp", "model", None),
    ("blocks", "attn", "k"): P(None, "fsdp", "model", None),
    ("blocks", "attn", "o"): P(None, "model", None, "fsdp"),
    ("blocks", "mlp", "gate"): P(None, "fsdp", "model"),
    ("blocks", "mlp", "down"): P(None, "model", "fsdp"),
}
FACTORS = {  # A's In axis like the base weight's input axis, B's Out axis like its output axis
    ("q", "a"): P(None, None, "fsdp", None), ("q", "b"): P(None, None, None, "model"),
    ("k", "a"): P(None, None, "fsdp", None), ("k", "b"): P(None, None, None, "model"),
    ("o", "a"): P(None, None, "model", None), ("o", "b"): P(None, None, None, "fsdp"),
    ("q", "scale"): P(None, None),
}
MLP_FACTORS = {
    ("gate", "a"): P(None, None, "fsdp", None), ("gate", "b"): P(None, None, None, "model"),
    ("down", "a"): P(None, None, "model", None), ("down", "b"): P(None, None, None, "fsdp"),
}


def mesh_for(name):
    return make_mesh(*MESHES[name])


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def spec(x) -> P:
    """x's PartitionSpec with one entry per axis (jit outputs drop trailing replicated axes)."""
    s = tuple(x.sharding.spec)
    return P(*s, *[None] * (x.ndim - len(s)))


def replicated(s: P) -> bool:
    return all(axis is None for axis in s)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the mesh section and the rules (no compilation) ---------------------------------------------------


def test_mesh_config_resolves_auto_and_fails_clearly():
    auto = MeshConfig()
    assert auto.sizes(8) == {"data": 8, "fsdp": 1, "model": 1}
    assert auto.sizes(8, weight_bytes=2 * GIB, device_bytes=16 * GIB) == {"data": 8, "fsdp": 1, "model": 1}
    # 18.5 GB of 9B weights on 8 x 16 GiB chips: the fewest fsdp devices that fit them (2) leave data = 4
    assert auto.sizes(8, weight_bytes=int(18.5e9), device_bytes=16 * GIB) == {"data": 4, "fsdp": 2, "model": 1}
    assert auto.sizes(8, weight_bytes=10 * GIB, device_bytes=3 * GIB) == {"data": 2, "fsdp": 4, "model": 1}
    assert MeshConfig(model=2).sizes(8, weight_bytes=10 * GIB, device_bytes=3 * GIB) == {"data": 2, "fsdp": 2,
                                                                                          "model": 2}
    assert MeshConfig(fsdp=4).sizes(8) == {"data": 2, "fsdp": 4, "model": 1}
    assert MeshConfig(data=2).sizes(8) == {"data": 2, "fsdp": 4, "model": 1}
    assert MeshConfig(data=2, fsdp=2).sizes(8) == {"data": 2, "fsdp": 2, "model": 2}
    with pytest.raises(ValueError, match="multiply to 3, which does not divide the 8 devices"):
        MeshConfig(data=3).sizes(8)
    with pytest.raises(ValueError, match=r"data\*fsdp\*model = 4, but there are 8 devices"):
        MeshConfig(data=2, fsdp=2, model=1).sizes(8)
    with pytest.raises(ValueError, match=r"weights \(100.00 GiB\) do not fit 3.00 GiB per device"):
        auto.sizes(8, weight_bytes=100 * GIB, device_bytes=3 * GIB)


def test_mesh_config_from_yaml_values_builds_over_every_device():
    assert from_dict(MeshConfig, {"data": "auto", "fsdp": 4, "model": None}) == MeshConfig(fsdp=4)
    with pytest.raises(ConfigError, match=r"data.*expected an integer > 0, got 0") as info:
        from_dict(MeshConfig, {"data": 0, "model": "two"})
    assert [p.path for p in info.value.problems] == ["data", "model"]
    # the layout only reorders float32 sums: it must not make finished stages stale
    assert section_hash("mesh", MeshConfig(fsdp=8)) == section_hash("mesh", MeshConfig())
    mesh = MeshConfig(fsdp=4).build()
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    with pytest.raises(ValueError, match="does not divide the 3 devices"):
        MeshConfig(data=2).build(devices=jax.devices()[:3])


def test_rules_split_the_batch_over_data_and_fsdp_with_fallbacks():
    mesh = mesh_for(FAST)
    assert DEFAULT_RULES.spec(("batch", None), mesh) == P(("data", "fsdp"), None)
    assert DEFAULT_RULES.spec(("batch", None), mesh_for("data8")) == P("data", None)
    assert DEFAULT_RULES.spec(("embed", "embed", "unnamed", None), mesh) == P("fsdp", None, None, None)
    assert DEFAULT_RULES.sharding(("batch",), mesh, (6,)).spec == P("data")  # 6 = 2 * 3: fsdp dropped
    assert DEFAULT_RULES.sharding(("batch",), mesh, (3,)).spec == P(None)
    host = np.arange(8 * 5).reshape(8, 5)
    placed = put(host, ("batch", None), mesh)
    assert spec(placed) == P(("data", "fsdp"), None) and placed.addressable_shards[0].data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(placed), host)


# ---- placement ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MESHES)
def test_weights_lora_factors_and_optimizer_state_are_placed_by_the_rules(name, tmp_path):
    mesh = mesh_for(name)
    data_only = name == "data8"
    model = place(lgeo_jax.init_model(CFG, seed=1), mesh)
    weights = {tuple(map(str, path)): spec(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}
    for path, want in WEIGHTS.items():
        assert weights[path] == (P(*[None] * len(want)) if data_only else want), path
    built = init_adapters(CFG, SPECS, seed=5, mesh=mesh)
    save_adapter(built, tmp_path, index=1)
    mlp = init_adapters(CFG, [AdapterSpec(rank=3, alpha=6, targets=("gate", "up", "down"))], mesh=mesh)
    for adapters, table in ((built, FACTORS), (load_adapter(tmp_path, config=CFG, mesh=mesh), FACTORS),
                            (prepare_adapters([init_adapters(CFG, SPECS[:1]), init_adapters(CFG, SPECS[1:])], CFG,
                                              mesh=mesh), FACTORS), (mlp, MLP_FACTORS)):
        for (target, part), want in table.items():
            got = spec(getattr(getattr(adapters, target), part).get_value())
            assert got == (P(*[None] * len(want)) if data_only else want), (target, part)
    params = {t: {"a": getattr(built, t).a.get_value(), "b": getattr(built, t).b.get_value()} for t in built.targets}
    state, _ = init_on_mesh(lora_optimizer(TRAIN, 3), params, mesh)
    adam = state[-1][0]  # chain(clip per adapter, adamw): adamw's scale_by_adam state
    for target, moments in (("q", adam.mu), ("o", adam.nu)):
        for part in ("a", "b"):
            assert spec(moments[target][part]) == spec(params[target][part]), (target, part)
    assert replicated(spec(adam.count))


# ---- every layout computes what one device computes --------------------------------------------------


def _examples(n: int, seed: int) -> list[TokenizedExample]:
    """Random token sequences of mixed lengths (so batches carry padding), loss on their second half."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(7, 22))
        loss_mask = (np.arange(length) >= length // 2).astype(np.int32)
        out.append(TokenizedExample(rng.integers(1, CFG.vocab_size, length).astype(np.int32), loss_mask, i, False))
    return out


def _batch() -> Batch:
    rng = np.random.default_rng(7)
    ids = rng.integers(0, CFG.vocab_size, (8, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:3, :4] = 0  # left padding on three rows
    loss = mask * (np.arange(13) >= 6)
    return Batch(input_ids=ids, attention_mask=mask, loss_mask=loss.astype(np.int32),
                 sample_index=np.arange(8, dtype=np.int32))


def _model(mesh):
    return place(lgeo_jax.init_model(CFG, seed=1), mesh)


def _random_b():
    return init_adapters(CFG, SPECS, seed=5, random_b=True)  # non-zero B: every factor gets a gradient


# What the equivalence tests compare, each computed on a mesh from the same host values.
PARTS = {
    "residuals": lambda mesh: lgeo_jax.residuals(_model(mesh), _batch().input_ids, layers=[0, 1], adapters=_random_b(),
                                                 attention_mask=_batch().attention_mask),
    "train": lambda mesh: train_lora(_model(mesh), init_adapters(CFG, SPECS, seed=5), _examples(24, seed=0), TRAIN,
                                     progress=False, length_buckets=1),
    "grads": lambda mesh: loss_and_grads(_model(mesh), _random_b(), _batch(), dropout_key=jax.random.key(11)),
    "heldout": lambda mesh: evaluate_heldout(_model(mesh), _random_b(), _examples(10, seed=1), batch_size=4),
}


@functools.cache
def single_device(part: str):
    return PARTS[part](one_device())


@pytest.mark.parametrize("name", MESH_PARAMS)
def test_residuals_and_lora_training_on_a_mesh_match_one_device(name):
    mesh = mesh_for(name)
    batch_axes = DEFAULT_RULES.spec(("batch",), mesh)[0]
    h, h_ref = PARTS["residuals"](mesh), np.asarray(single_device("residuals"))
    assert spec(h) == P(None, None, batch_axes, None, None)  # [A, C, B, T, D]: the activations' batch is split
    assert np.abs(np.asarray(h) - h_ref).max() < 5e-6 * np.abs(h_ref).max()
    train, train_ref = PARTS["train"](mesh), single_device("train")
    np.testing.assert_allclose(train.losses, train_ref.losses, rtol=1e-6)
    for t in train_ref.adapters.targets:
        for i, part in enumerate("ab"):
            factor = train.adapters.factors(t)[i]
            want = FACTORS.get((t, part))
            if want is not None:
                assert spec(factor) == (P(*[None] * 4) if name == "data8" else want), (t, part)
            # B starts at 0, so all of B is what the 3 steps learnt: a wrong gradient cannot hide under 1e-5
            assert rel(factor, train_ref.adapters.factors(t)[i]) < 1e-5, (t, part)


@pytest.mark.slow
@pytest.mark.parametrize("name", MESHES)
def test_gradients_and_heldout_eval_on_a_mesh_match_one_device(name):
    mesh = mesh_for(name)
    (loss, grads), (loss_ref, grads_ref) = PARTS["grads"](mesh), single_device("grads")
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for t in grads_ref:
        for part in ("a", "b"):
            assert rel(grads[t][part], grads_ref[t][part]) < 1e-5, (t, part)
    ev, ev_ref = PARTS["heldout"](mesh), single_device("heldout")
    np.testing.assert_allclose([ev.base_loss, *ev.adapter_loss], [ev_ref.base_loss, *ev_ref.adapter_loss], rtol=1e-6)
    np.testing.assert_allclose(ev.logit_delta_norm, ev_ref.logit_delta_norm, rtol=1e-6)


def test_resume_on_a_mesh_restores_the_shardings_and_is_bitwise_identical(tmp_path):
    mesh = mesh_for(FAST)
    model = _model(mesh)
    examples = _examples(24, seed=0)
    full = train_lora(model, init_adapters(CFG, SPECS, seed=5), examples, TRAIN, progress=False, length_buckets=1)
    first = train_lora(model, init_adapters(CFG, SPECS, seed=5), examples, TRAIN, progress=False, length_buckets=1,
                       checkpoint_dir=tmp_path, stop_after=1)
    assert first.steps_done == 1 and TrainCheckpoints(tmp_path).latest_step() == 1
    resumed = train_lora(model, init_adapters(CFG, SPECS, seed=5), examples, TRAIN, progress=False,
                         length_buckets=1, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1 and resumed.steps_done == 3
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for t in full.adapters.targets:
        for i, part in enumerate("ab"):
            factor = resumed.adapters.factors(t)[i]
            if (t, part) in FACTORS:
                assert spec(factor) == FACTORS[t, part], (t, part)
            np.testing.assert_array_equal(np.asarray(factor), np.asarray(full.adapters.factors(t)[i]))


def test_logits_keep_the_batch_split_and_fall_back_on_an_odd_vocabulary():
    mesh = mesh_for(FAST)
    model = _model(mesh)
    ids = put(_batch().input_ids, ("batch", None), mesh)
    with mesh_context(mesh):
        logits = jax.jit(lambda m, i: m(i))(model, ids)  # [A, B, T, V]
    assert spec(logits) == P(None, ("data", "fsdp"), None, None)  # V = 97 cannot split over model


@pytest.mark.slow
def test_pretraining_on_a_mesh_matches_one_device():
    cfg = BuiltinModelConfig(**{**dataclasses.asdict(CFG), "pretrain_steps": 3, "pretrain_lr": 3e-3,
                                "pretrain_batch_size": 8})
    examples = _examples(24, seed=0)
    mesh = mesh_for(FAST)
    sharded = pretrain_base(cfg, examples, mesh=mesh, progress=False)
    single = pretrain_base(cfg, examples, mesh=one_device(), progress=False)
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-6)
    assert spec(sharded.model.blocks.attn.q.get_value()) == WEIGHTS["blocks", "attn", "q"]
    for (path, var), (_, ref) in zip(nnx.to_flat_state(nnx.state(sharded.model)),
                                     nnx.to_flat_state(nnx.state(single.model)), strict=True):
        assert rel(var.get_value(), ref.get_value()) < 1e-5, path  # measured 8e-7
