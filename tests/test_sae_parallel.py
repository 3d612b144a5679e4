"""Many SAEs at once: vmapped == one at a time, 1 device == 8 devices (sharded), exact checkpoint resume."""

import jax
import numpy as np
import pytest
from sae_helpers import one_device, quiet_train, small_cfg, streams

from lgeo_jax.sae import ArraySource, SAEConfig, default_mesh, read_metrics
from lgeo_jax.sae._step import make_optimizer
from lgeo_jax.sae._train import _init_state_shapes, _shardings
from lgeo_jax.sharding import make_mesh


def test_vmapped_equals_one_at_a_time(tmp_path):
    """Same seeds, same data: 8 SAEs in one vmapped job == each trained alone, to float32 rounding (2e-5).

    Precondition, checked: no latent is silent for a whole batch. Adam turns a latent's first nonzero
    gradient into a full lr-sized step however small it is, so a latent "born" from a 1e-8 pre-activation
    in one run but not the other (batched vs unbatched matmul rounding) would differ by O(lr), not O(eps).
    """
    src = streams(8)
    l1s, seeds = [0.05 * (i + 1) for i in range(8)], list(range(10, 18))
    cfg, tc = SAEConfig(24, 40), small_cfg(batch_size=256, dead_window_fraction=0.1, log_every=1,
                                               checkpoint_every=100)
    together = quiet_train(src, cfg, tc, l1s, seeds, tmp_path / "all", mesh=one_device())
    assert all(r["dead_frac"] == 0 for r in read_metrics(tmp_path / "all" / "metrics.csv"))
    for i in range(8):
        alone_src = ArraySource([src._arrays[i]], names=[src.names[i]], held_out=[src._held[i]], seed=3)
        alone = quiet_train(alone_src, cfg, tc, [l1s[i]], [seeds[i]], tmp_path / f"one{i}",
                           mesh=one_device()).saes[0]
        assert alone.scale == pytest.approx(together.saes[i].scale, rel=1e-6)
        for name, value in alone.params.items():
            np.testing.assert_allclose(together.saes[i].params[name], value, rtol=2e-5,
                                       atol=2e-5 * np.abs(value).max())


def test_one_device_equals_eight(tmp_path):
    assert jax.device_count() == 8, "conftest should give 8 CPU devices"
    src = streams(8)
    l1s, seeds = [0.1] * 4 + [0.3] * 4, list(range(8))
    cfg = SAEConfig(24, 40)
    one = quiet_train(src, cfg, small_cfg(), l1s, seeds, tmp_path / "one", mesh=one_device())
    eight = quiet_train(src, cfg, small_cfg(), l1s, seeds, tmp_path / "eight", mesh=make_mesh(data=2, model=4))
    for a, b in zip(one.saes, eight.saes, strict=True):
        for name in a.params:
            np.testing.assert_allclose(b.params[name], a.params[name], rtol=2e-5,
                                       atol=2e-5 * np.abs(a.params[name]).max())
    held_one = {r["name"]: r["heldout_fvu"] for r in one.final_metrics}
    held_eight = {r["name"]: r["heldout_fvu"] for r in eight.final_metrics}
    assert held_one == pytest.approx(held_eight, rel=1e-4)


def test_exact_resume_and_config_hash(tmp_path):
    src = streams(2)
    cfg = SAEConfig(24, 40)
    mesh = make_mesh(model=2, devices=jax.devices()[:2])  # sharded state, so restore must place shards
    straight = quiet_train(src, cfg, small_cfg(), [0.1, 0.2], [0, 1], tmp_path / "a", mesh=mesh)
    quiet_train(src, cfg, small_cfg(), [0.1, 0.2], [0, 1], tmp_path / "b", mesh=mesh, stop_after=3)
    resumed = quiet_train(src, cfg, small_cfg(), [0.1, 0.2], [0, 1], tmp_path / "b", mesh=mesh)
    for a, b in zip(straight.saes, resumed.saes, strict=True):
        for name in a.params:
            np.testing.assert_array_equal(a.params[name], b.params[name])
    rows_a, rows_b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    assert [r["mse"] for r in rows_a] == [r["mse"] for r in rows_b]
    with pytest.raises(ValueError, match="config hash"):
        quiet_train(src, cfg, small_cfg(lr=1e-3), [0.1, 0.2], [0, 1], tmp_path / "b", mesh=mesh)
    with pytest.raises(ValueError, match="config hash"):
        quiet_train(src, cfg, small_cfg(), [0.1, 0.25], [0, 1], tmp_path / "b", mesh=mesh)


def test_sae_axis_is_sharded_on_model_and_tokens_on_data():
    mesh = make_mesh(data=2, model=4)
    cfg, tc = SAEConfig(24, 40), small_cfg()
    state = jax.eval_shape(lambda: _init_state_shapes(8, cfg, make_optimizer(tc, 6)))
    shardings = _shardings(state, mesh)
    assert shardings.params["W_enc"].spec == jax.sharding.PartitionSpec("model", None, None)
    assert shardings.scale.spec == jax.sharding.PartitionSpec("model")
    assert dict(default_mesh(24).shape) == {"data": 1, "fsdp": 1, "model": 8}
    assert dict(default_mesh(6).shape) == {"data": 4, "fsdp": 1, "model": 2}


def test_stacked_sources_keep_their_own_orders(tmp_path):
    """Two seeds' sources over the same arrays: each part serves its own row order, and training them stacked
    equals training each part alone (the SAE axis never mixes them)."""
    from lgeo_jax.sae import StackedSource

    base = streams(2)
    parts = [ArraySource(base._arrays, names=[f"{n}_s{seed}" for n in base.names], held_out=base._held, seed=seed)
             for seed in (0, 1)]
    stacked = StackedSource(parts)
    assert stacked.names == ("a0_s0", "a1_s0", "a0_s1", "a1_s1")
    b = stacked.batch(0, 64)
    assert (b.rows[0] == b.rows[1]).all() and not (b.rows[0] == b.rows[2]).all()  # per part, not per array
    np.testing.assert_array_equal(b.x[2], base._arrays[0][b.rows[2]])
    cfg, tc = SAEConfig(24, 40), small_cfg()
    together = quiet_train(stacked, cfg, tc, [0.1] * 4, [0, 1, 2, 3], tmp_path / "all", mesh=one_device())
    alone = quiet_train(parts[1], cfg, tc, [0.1] * 2, [2, 3], tmp_path / "one", mesh=one_device())
    for a, b in zip(together.saes[2:], alone.saes, strict=True):
        np.testing.assert_allclose(a.params["W_dec"], b.params["W_dec"], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="differ in"):
        StackedSource([parts[0], streams(1, rows=512)])
