"""Per-table metrics against independent float64 numpy / scipy computations, nulls, and input errors."""

import jax
import numpy as np
import pytest
import scipy.linalg

from lgeo_jax.analysis import (
    AnalysisConfig,
    DeviceSAE,
    ErrorSums,
    LayerSAEs,
    NullCache,
    OverlapSums,
    adapter_pass,
    angle_stats,
    compare,
    improvement,
    live_rows,
    max_cosine_stats,
    random_init_decoder,
    table4,
    table12,
)
from lgeo_jax.geometry import expected_max_cosine
from lgeo_jax.sae import SAE, SAEConfig, init_params


def _batches(n_rows: int, sizes=(7, 30, 3)):
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == n_rows
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def test_error_sums_match_float64_by_hand():
    rng = np.random.default_rng(0)
    x = (1e3 + rng.normal(size=(40, 11))).astype(np.float32)  # mean >> spread: fvu must not cancel
    x[5] = 0.0  # a zero target: skipped by the mean of ratios, counted in the pooled sums
    x_hat = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    sums = ErrorSums()
    for rows in _batches(40):
        sums.add(x[rows], x_hat[rows])
    got = sums.result()
    x64, h64 = x.astype(np.float64), x_hat.astype(np.float64)
    err = np.sum((x64 - h64) ** 2, axis=1)
    norm = np.sum(x64**2, axis=1)
    keep = norm > 0
    np.testing.assert_allclose(got["rel_l2"], np.mean(np.sqrt(err[keep] / norm[keep])), rtol=1e-12)
    np.testing.assert_allclose(got["rel_l2_pooled"], np.sqrt(err.sum() / norm.sum()), rtol=1e-12)
    np.testing.assert_allclose(got["fvu"], err.sum() / np.sum((x64 - x64.mean(0)) ** 2), rtol=1e-10)
    assert got["n_tokens"] == 40 and got["n_zero_norm"] == 1


def test_error_sums_reject_bad_input():
    with pytest.raises(ValueError, match="no tokens"):
        ErrorSums().result()
    with pytest.raises(ValueError, match="must be equal"):
        ErrorSums().add(np.ones((3, 4)), np.ones((3, 5)))


def test_improvement_is_one_minus_ratio():
    got = improvement({"rel_l2": 0.340, "rel_l2_pooled": 0.5, "fvu": None}, {"rel_l2": 2.457, "rel_l2_pooled": 0.0,
                                                                             "fvu": 1.0})
    assert round(got["rel_l2"], 1) == 86.2  # the paper's Table 7, L5 r4
    assert got["rel_l2_pooled"] is None and got["fvu"] is None  # undefined, never a fake number


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_overlap_against_a_brute_force_loop(threshold):
    rng = np.random.default_rng(1)
    f_delta = np.maximum(rng.normal(size=(40, 23)) - 0.8, 0)
    f_base = np.maximum(rng.normal(size=(40, 23)) - 0.5, 0)
    f_delta[3] = 0.0  # a token with no active delta feature: left out of the average
    sums = OverlapSums(threshold=threshold)
    batches = _batches(40)
    for rows in batches:
        sums.add(f_delta[rows], f_base[rows])
    got = sums.result()
    ratios, chance, shuffled, shared_total, active_total, chance_pooled, shuffled_total = [], [], [], 0, 0, 0.0, 0
    for rows in batches:
        idx = list(range(rows.start, rows.stop))
        for i, t in enumerate(idx):
            other = idx[(i - len(idx) // 2) % len(idx)]  # the token whose base row the shuffled null uses
            on_d = {j for j in range(23) if f_delta[t, j] > threshold}
            on_b = {j for j in range(23) if f_base[t, j] > threshold}
            on_o = {j for j in range(23) if f_base[other, j] > threshold}
            shared_total += len(on_d & on_b)
            shuffled_total += len(on_d & on_o)
            active_total += len(on_d)
            chance_pooled += len(on_d) * len(on_b) / 23
            if on_d:
                ratios.append(len(on_d & on_b) / len(on_d))
                chance.append(len(on_b) / 23)
                shuffled.append(len(on_d & on_o) / len(on_d))
    np.testing.assert_allclose(got["overlap"], np.mean(ratios), rtol=1e-12)
    np.testing.assert_allclose(got["overlap_pooled"], shared_total / active_total, rtol=1e-12)
    np.testing.assert_allclose(got["null_chance"], np.mean(chance), rtol=1e-12)
    np.testing.assert_allclose(got["null_chance_pooled"], chance_pooled / active_total, rtol=1e-12)
    np.testing.assert_allclose(got["null_shuffled"], np.mean(shuffled), rtol=1e-12)
    np.testing.assert_allclose(got["null_shuffled_pooled"], shuffled_total / active_total, rtol=1e-12)
    assert got["tokens_with_active"] == len(ratios) and got["active_delta"] == active_total / 40


def test_max_cosine_and_angle_stats():
    values = np.array([0.1, 0.25, 0.3, 0.5, 0.71, 0.9])
    got = max_cosine_stats(values)
    assert got == {"mean": pytest.approx(values.mean()), "median": pytest.approx(0.4),
                   "pct_below": pytest.approx(100 / 3), "pct_above": pytest.approx(100 / 3), "n": 6}  # strict cuts
    with pytest.raises(ValueError, match="not finite"):
        max_cosine_stats(np.array([0.1, np.nan]))
    angles = np.array([[10.0, 30.0, 70.0, 80.0], [20.0, 50.0, 69.9, 90.0]])
    got = angle_stats(angles, near_orthogonal=70.0, aligned=30.0)
    assert got["mean"] == pytest.approx(angles.mean()) and got["min"] == pytest.approx(15.0)
    assert got["pct_near_orthogonal"] == pytest.approx(100 * 3 / 8) and got["pct_aligned"] == pytest.approx(100 * 3 / 8)


def _numpy_top_subspace(rows: np.ndarray, k: int) -> np.ndarray:
    rows = rows[np.linalg.norm(rows, axis=1) > 0].astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return np.linalg.svd(unit, full_matrices=False)[2][:k]  # [K, D]


def test_compare_against_numpy_and_scipy():
    rng = np.random.default_rng(2)
    d, k = 17, 4
    a = rng.normal(size=(29, d)) * rng.uniform(0.5, 3, size=(29, 1))
    b = rng.normal(size=(37, d))
    b[:6] = a[:6] + 0.05 * rng.normal(size=(6, d))  # some shared directions
    live = rng.random(29) > 0.3
    got = compare(live_rows(a, live), live_rows(b), k)
    a64 = a[live] / np.linalg.norm(a[live], axis=1, keepdims=True)
    b64 = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = a64 @ b64.T
    np.testing.assert_allclose(got.max_cos, cos.max(axis=1), atol=2e-6)
    np.testing.assert_allclose(got.max_cos_abs, np.abs(cos).max(axis=1), atol=2e-6)
    want = np.degrees(scipy.linalg.subspace_angles(_numpy_top_subspace(live_rows(a, live), k).T,
                                                   _numpy_top_subspace(b, k).T))[::-1]  # ascending
    np.testing.assert_allclose(got.angles, want, atol=1e-3)


def _jumprelu(seed: int, d: int, f: int) -> SAE:
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d),
              "W_dec": rng.normal(size=(f, d)).astype(np.float32) / np.sqrt(d),
              "b_enc": (0.1 * rng.normal(size=f)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32),
              "threshold": rng.uniform(0.0, 0.6, size=f).astype(np.float32)}
    return SAE(SAEConfig(d, f, "jumprelu"), params)


def _relu(seed: int, d: int, f: int, scale: float) -> SAE:
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(seed), SAEConfig(d, f)).items()}
    params["b_enc"] = np.random.default_rng(seed).normal(size=f).astype(np.float32) * 0.3 - 0.2
    params["b_dec"] = np.random.default_rng(seed + 1).normal(size=d).astype(np.float32) * 0.1
    return SAE(SAEConfig(d, f), params, scale)


def _np_forward(sae: SAE, x: np.ndarray):
    p = {k: v.astype(np.float64) for k, v in sae.params.items()}
    x = x.astype(np.float64) / sae.scale
    if sae.cfg.architecture.value == "jumprelu":
        pre = x @ p["W_enc"] + p["b_enc"]
        f = np.where(pre > p["threshold"], np.maximum(pre, 0), 0.0)
    else:
        f = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    return f, (f @ p["W_dec"] + p["b_dec"]) * sae.scale


def test_adapter_pass_against_float64_numpy():
    """Tables 5 (both columns), 6, 8 and 11 on three batches vs a float64 numpy pass over all rows at once."""
    rng = np.random.default_rng(3)
    d, n = 13, 40
    base = (rng.normal(size=(n, d)) * 2 + 4).astype(np.float32)
    delta = (rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) * 0.3 + 0.3 * base).astype(np.float32)
    gs, sae = _jumprelu(0, d, 31), _relu(1, d, 19, scale=0.7)
    result = adapter_pass(((base[r], delta[r]) for r in _batches(n)), DeviceSAE(gs), {0: DeviceSAE(sae)})
    got = result.summary()
    b64, d64 = base.astype(np.float64), delta.astype(np.float64)

    def rel(x, x_hat):
        return np.mean(np.linalg.norm(x - x_hat, axis=1) / np.linalg.norm(x, axis=1))

    f_delta, delta_hat = _np_forward(gs, d64)
    f_base, base_hat = _np_forward(gs, b64)
    _, adapted_hat = _np_forward(gs, b64 + d64)
    f_sae, sae_hat = _np_forward(sae, d64)
    np.testing.assert_allclose(got["table5"]["direct"]["rel_l2"], rel(d64, delta_hat), rtol=1e-4)
    np.testing.assert_allclose(got["table5"]["difference"]["rel_l2"], rel(d64, adapted_hat - base_hat), rtol=1e-4)
    np.testing.assert_allclose(got["table6"]["0"]["rel_l2"], rel(d64, sae_hat), rtol=1e-4)
    np.testing.assert_allclose(got["table6"]["0"]["fvu"], np.sum((d64 - sae_hat) ** 2)
                               / np.sum((d64 - d64.mean(0)) ** 2), rtol=1e-4)
    np.testing.assert_allclose(got["table6"]["0"]["dead_fraction"], np.mean(~(f_sae > 0).any(axis=0)))
    np.testing.assert_allclose(got["table6"]["0"]["l0"], np.mean((f_sae > 0).sum(axis=1)), rtol=1e-6)
    on_d, on_b = f_delta > 0, f_base > 0
    keep = on_d.sum(1) > 0
    np.testing.assert_allclose(got["table8"]["overlap"],
                               np.mean((on_d & on_b).sum(1)[keep] / on_d.sum(1)[keep]), rtol=1e-6)

    def cka(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    np.testing.assert_allclose(got["table11"]["delta_base"], cka(d64, b64), rtol=1e-5)
    np.testing.assert_allclose(got["table11"]["base_adapted"], cka(b64, b64 + d64), rtol=1e-5)


def test_random_direction_nulls_match_the_exact_expectation():
    nulls = NullCache(AnalysisConfig(null_samples=3, null_seed=4))
    draw, summary = nulls.max_cosine(4000, 4000, 300, 32)
    exact = expected_max_cosine(300, 32)
    se = draw["max_cos"].std() / np.sqrt(draw["max_cos"].size)
    assert abs(summary["max_cosine"]["mean"] - exact) < 5 * se
    assert summary["max_cosine"]["expected"] == pytest.approx(exact)
    part, part_summary = nulls.max_cosine(1000, 4000, 300, 32)  # same draw, first 1000 rows
    np.testing.assert_array_equal(part["max_cos"], draw["max_cos"][:1000])
    assert part_summary["max_cosine"]["n"] == 1000
    angles, angle_summary = nulls.angles(4, 32)
    assert angles.shape == (3, 4) and nulls.angles(4, 32)[0] is angles
    assert 0 <= angle_summary["mean"] <= 90 and "limit" in angle_summary
    w = random_init_decoder(50, 32, seed=0)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)


def test_layer_saes_width_mismatch_names_the_sae():
    delta = {"r4": {0: _relu(1, 13, 19, 1.0), 1: _relu(2, 12, 19, 1.0)}}
    saes = LayerSAEs(dictionary=_jumprelu(0, 13, 31), delta=delta)
    with pytest.raises(ValueError, match="layer 7: delta SAE r4 seed 1 has d_in=12, but the corpus has d_model=13"):
        saes.check(7, 13)


def test_table4_and_table12_parsing():
    entry = {"count": 10, "mean_norm": 2.0, "rms_scale": 1.0, "norm_sum": 20.0, "sq_sum": 50.0}
    stats = {"splits": {"probe": {"base": {"L5": {**entry, "mean_norm": 8.0}}, "r4": {"L5": entry}}}}
    assert table4(stats, ["r4"], [5])["probe"]["r4"]["L5"]["ratio"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no layer 6 for 'r4'"):
        table4(stats, ["r4"], [6])
    with pytest.raises(ValueError, match="no 'splits'"):
        table4({}, ["r4"], [5])
    sweep = {"adapter": "r4", "layer": 5, "selected_l1": 0.15, "normalize": "rms",
             "points": [{"l1_coeff": 0.15, "l0": 31.4, "fvu": 0.1}, {"l1_coeff": 0.08, "l0": 42.9, "fvu": 0.05}]}
    rows = table12(sweep)["rows"]
    assert table12(sweep)["arm"] == "post_norm" and table12({**sweep, "normalize": "none"})["arm"] == "pre_norm"
    assert [r["l1"] for r in rows] == [0.08, 0.15] and [r["selected"] for r in rows] == [False, True]
    with pytest.raises(ValueError, match="not an L1 sweep record"):
        table12({"points": [{"l0": 3}]})
