"""Crosscoders: planted streams (shared / base-only / adapter-only directions) recovered and classified,
latent scaling against a float64 numpy least-squares reference, many-at-once == one-at-a-time, 8 devices == 1,
exact resume, the on-disk format and the config's checks."""

import json

import jax
import numpy as np
import pytest

from lgeo_jax.analysis import (
    CLASSES,
    analyze_crosscoder,
    closed_form_beta,
    latent_classes,
    latent_scaling,
    live_sae_rows,
    norm_diff,
)
from lgeo_jax.config import ConfigError, from_dict
from lgeo_jax.crosscoder import (
    CrossArch,
    CrosscoderConfig,
    PairSource,
    crosscoder_health,
    initial_decoder,
    load_crosscoder,
    train_crosscoders,
)
from lgeo_jax.sae import SAE, ArraySource, SAEConfig
from lgeo_jax.sharding import make_mesh

D, N_SHARED, N_BASE, N_ADAPTER = 24, 8, 4, 4
N_FEAT = N_SHARED + N_BASE + N_ADAPTER


def planted(n_rows: int, seed: int = 0):
    """Sparse features; shared ones appear in both streams, base-only ones in h_base only, adapter-only ones in
    h_adapted only. Returns h_base, delta and the true concatenated decoder rows [N_FEAT, 2, D] and classes."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(N_FEAT, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    coef = (rng.random((n_rows, N_FEAT)) < 0.12) * rng.uniform(1, 3, (n_rows, N_FEAT))  # [N, K]
    sh, bo, ao = slice(0, N_SHARED), slice(N_SHARED, N_SHARED + N_BASE), slice(N_SHARED + N_BASE, N_FEAT)
    base = coef[:, sh] @ dirs[sh] + coef[:, bo] @ dirs[bo]
    adapted = coef[:, sh] @ dirs[sh] + coef[:, ao] @ dirs[ao]
    true = np.zeros((N_FEAT, 2, D))
    true[sh, 0] = true[sh, 1] = dirs[sh]
    true[bo, 0], true[ao, 1] = dirs[bo], dirs[ao]
    classes = np.array([1] * N_SHARED + [0] * N_BASE + [2] * N_ADAPTER)  # indices into CLASSES
    return base.astype(np.float32), (adapted - base).astype(np.float32), true, classes


def source(bases, deltas, held=256, seed=0):
    """One stream per delta; every crosscoder reads base `bases[i]`."""
    return PairSource(ArraySource(bases, held_out=[b[:held] for b in bases], seed=seed),
                      ArraySource(deltas, held_out=[d[:held] for d in deltas], seed=seed))


def unit(w):
    w = w.reshape(w.shape[0], -1)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base, delta, true, classes = planted(8192)
    cfg = CrosscoderConfig(width=32, k=2, lr=3e-3, batch_size=256, steps=1500, eval_rows=512, checkpoint_every=10_000)
    result = train_crosscoders(source([base], [delta], held=512), cfg, [0], tmp_path_factory.mktemp("cc"),
                               progress=False)
    return result, base, delta, true, classes


def test_planted_directions_recovered_and_classified(trained):
    result, base, delta, true, classes = trained
    cc = result.crosscoders[0]
    cos = unit(true) @ unit(cc.decoders()).T  # [K, F]
    assert cos.max(axis=1).min() > 0.9, np.round(cos.max(axis=1), 3)
    cls = latent_classes(norm_diff(cc.decoders()), cc.cfg)
    # every planted feature: its best latent carries the planted class
    assert np.mean(cls[cos.argmax(axis=1)] == classes) >= 0.9
    # every live latent (fires on held-out rows): classified as the planted feature it matches best
    x = np.concatenate([base[:2048], base[:2048] + delta[:2048]], axis=1)
    live = np.flatnonzero(np.asarray(cc.encode(x)).max(axis=0) > 0)
    assert live.size >= N_FEAT
    right = (cls[live] == classes[cos[:, live].argmax(axis=0)]) & (cos[:, live].max(axis=0) > 0.9)
    assert right.mean() >= 0.9, (right.mean(), np.round(norm_diff(cc.decoders())[live], 2))
    health = crosscoder_health(cc, initial_decoder(D, cc.cfg, 0), result.final_metrics[0])
    assert health.healthy, health.problems


def test_analysis_record_and_delta_sae_comparison(trained):
    result, base, delta, true, _ = trained
    cc = result.crosscoders[0]
    x = np.concatenate([base[:2048], base[:2048] + delta[:2048]], axis=1)
    # a perfect delta dictionary: the delta's own directions (adapter-only w, base-only -v)
    sae_rows = np.concatenate([true[N_SHARED + N_BASE:, 1], -true[N_SHARED:N_SHARED + N_BASE, 0]])
    record, arrays = analyze_crosscoder(cc, x, sae_rows, null_samples=20, seed=0, n_boot=200, level=0.95)
    assert record["classes"]["adapter_only"] >= N_ADAPTER and record["classes"]["base_only"] >= N_BASE
    assert record["random_init_classes"]["adapter_only"] == record["random_init_classes"]["base_only"] == 0
    comp = record["vs_delta_sae"]
    assert comp["max_cosine"]["value"] > 0.9 and comp["max_cosine"]["vs_null"] == 1
    assert comp["max_cosine"]["vs_random_init"] == 1 and comp["matched_vs_null"] == 1
    # the base stream lacks the adapter-only directions: its beta is far below the adapter stream's
    assert record["scaling"]["adapter_only"]["nu_recon"]["value"] < 0.5
    assert record["scaling"]["base_only"]["nu_recon"]["value"] < 0.5
    json.dumps(record)  # JSON-able, as the stage writes it
    assert np.isfinite(arrays["norm_diff"]).all() and arrays["class"].shape == (cc.cfg.width,)


def _lstsq_beta(f, d, y):
    """Reference: per latent, np.linalg.lstsq of the [N*D] target on the single regressor f_t d."""
    return np.array([np.linalg.lstsq(np.outer(f[:, j], d[j]).reshape(-1, 1), y[j].reshape(-1), rcond=None)[0][0]
                     for j in range(d.shape[0])])


def test_comparison_takes_the_delta_sae_live_rows_only():
    """Latents that never fire on the deltas (a huge negative encoder bias) and one that fires on a single row of
    1000 (below a density of 1e-2) are left out; the rows kept are the live ones, in order."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(D, 6)).astype(np.float32)
    b_enc = np.zeros(6, np.float32)
    b_enc[[1, 4]] = -1e6  # dead
    delta = rng.normal(size=(1000, D)).astype(np.float32)
    top2 = np.sort(delta @ w[:, 5])[-2:]
    b_enc[5] = -top2.mean()  # fires on exactly one row: the largest pre-activation
    sae = SAE(SAEConfig(d_in=D, d_sae=6), {"W_enc": w, "b_enc": b_enc, "W_dec": w.T.copy(),
                                           "b_dec": np.zeros(D, np.float32)})
    np.testing.assert_array_equal(live_sae_rows(sae, delta, 1e-2), w.T[[0, 2, 3]])
    np.testing.assert_array_equal(live_sae_rows(sae, delta, 0.0), w.T[[0, 2, 3, 5]])


def test_closed_form_beta_equals_lstsq():
    rng = np.random.default_rng(1)
    n, j, d = 300, 5, 7
    f = np.maximum(rng.normal(size=(n, j)), 0)
    dirs, own, y = rng.normal(size=(j, d)), rng.normal(size=(j, d)), rng.normal(size=(n, d))
    targets = y[None] + f.T[:, :, None] * own[:, None]  # [J, N, D]
    np.testing.assert_allclose(closed_form_beta(f, dirs, y), _lstsq_beta(f, dirs, np.broadcast_to(y, (j, n, d))),
                               rtol=1e-6)
    np.testing.assert_allclose(closed_form_beta(f, dirs, y, own), _lstsq_beta(f, dirs, targets), rtol=1e-6)


def test_latent_scaling_of_a_crosscoder_equals_lstsq(trained):
    result, base, delta, _, _ = trained
    cc = result.crosscoders[0]
    x = np.concatenate([base[:512], base[:512] + delta[:512]], axis=1)
    idx = np.flatnonzero(latent_classes(norm_diff(cc.decoders()), cc.cfg) == CLASSES.index("adapter_only"))
    got = latent_scaling(cc, x, idx, own_stream=1)  # one chunk: the reference sees the same float32 f and x_hat
    f = np.asarray(cc.encode(x), np.float64)  # [N, F]
    x_hat = np.asarray(cc.decode(f.astype(np.float32)), np.float64)
    dec = cc.decoders().astype(np.float64) * cc.scale  # [F, 2, D]
    d = dec[idx, 1]
    for s, stream in enumerate(("base", "adapted")):
        h = x[:, s * D:(s + 1) * D].astype(np.float64)
        err = h - x_hat[:, s * D:(s + 1) * D]
        recon = _lstsq_beta(f[:, idx], d, np.broadcast_to(h, (idx.size, *h.shape)))
        error = _lstsq_beta(f[:, idx], d, err[None] + f[:, idx].T[:, :, None] * dec[idx, s][:, None])
        np.testing.assert_allclose(got[f"beta_recon_{stream}"], recon, rtol=1e-6)
        np.testing.assert_allclose(got[f"beta_error_{stream}"], error, rtol=1e-6)
    np.testing.assert_allclose(got["nu_error"], got["beta_error_base"] / got["beta_error_adapted"], rtol=1e-12)


def _job(arch: CrossArch, steps: int = 30):
    extra = {"k": 3} if arch is CrossArch.BATCHTOPK else {"k": None, "l1": 0.3}
    # dead_window 0.1 x 30 steps: AuxK switches on inside the run, so both branches are compared
    return CrosscoderConfig(architecture=arch, width=16, lr=3e-3, batch_size=64, steps=steps, eval_rows=64,
                            log_every=10, checkpoint_every=10, **extra)


def _params(result):
    return [{k: np.asarray(v) for k, v in cc.params.items()} for cc in result.crosscoders]


def _assert_same(a, b, rtol=2e-5):
    for pa, pb in zip(a, b, strict=True):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("arch", list(CrossArch))
def test_many_at_once_equal_each_alone(arch, tmp_path):
    base, delta, _, _ = planted(2048)
    deltas = [delta, 0.5 * delta, np.roll(delta, 1, axis=1)]
    cfg = _job(arch)
    src = PairSource(ArraySource([base], sae_to_array=[0, 0, 0], held_out=[base[:256]]),
                     ArraySource(deltas, held_out=[d[:256] for d in deltas]))
    together = _params(train_crosscoders(src, cfg, [0, 1, 2], tmp_path / "all", progress=False))
    alone = [_params(train_crosscoders(source([base], [d]), cfg, [s], tmp_path / f"one{s}", progress=False))[0]
             for s, d in enumerate(deltas)]
    _assert_same(together, alone)


def test_eight_devices_equal_one(tmp_path):
    base, delta, _, _ = planted(2048)
    deltas = [delta, 0.5 * delta, -delta, 2 * delta]
    src = PairSource(ArraySource([base], sae_to_array=[0] * 4, held_out=[base[:256]]),
                     ArraySource(deltas, held_out=[d[:256] for d in deltas]))
    cfg = _job(CrossArch.BATCHTOPK)
    assert jax.device_count() == 8
    eight = train_crosscoders(src, cfg, [0, 1, 2, 3], tmp_path / "eight", mesh=make_mesh(data=2, model=4),
                              progress=False)
    one = train_crosscoders(src, cfg, [0, 1, 2, 3], tmp_path / "one", mesh=make_mesh(devices=jax.devices()[:1]),
                            progress=False)
    _assert_same(_params(eight), _params(one))


def test_resume_is_exact_and_refuses_a_changed_job(tmp_path):
    base, delta, _, _ = planted(2048)
    cfg = _job(CrossArch.BATCHTOPK)
    straight = train_crosscoders(source([base], [delta]), cfg, [0], tmp_path / "a", progress=False)
    train_crosscoders(source([base], [delta]), cfg, [0], tmp_path / "b", progress=False, stop_after=20)
    resumed = train_crosscoders(source([base], [delta]), cfg, [0], tmp_path / "b", progress=False)
    _assert_same(_params(straight), _params(resumed), rtol=0)
    with pytest.raises(ValueError, match="config hash|hash"):
        train_crosscoders(source([base], [delta]), _job(CrossArch.BATCHTOPK, steps=40), [0], tmp_path / "b",
                          progress=False)
    loaded = load_crosscoder(tmp_path / "b" / "crosscoders" / "sae0")
    _assert_same([loaded.params], _params(resumed), rtol=0)
    assert loaded.scale == resumed.crosscoders[0].scale and loaded.cfg == cfg
    (tmp_path / "b" / "crosscoders" / "sae0" / "cfg.json").write_text(json.dumps({"format": "lgeo_sae"}))
    with pytest.raises(ValueError, match="cfg.json: not a crosscoder"):
        load_crosscoder(tmp_path / "b" / "crosscoders" / "sae0")


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="l1"):
        from_dict(CrosscoderConfig, {"architecture": "l1", "k": None})
    with pytest.raises(ConfigError, match="shared_range"):
        from_dict(CrosscoderConfig, {"shared_range": [0.05, 0.6]})
    with pytest.raises(ConfigError, match="k"):
        from_dict(CrosscoderConfig, {"width": 8, "k": 9})
