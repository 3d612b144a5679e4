"""Per-table metrics and their intervals against independent float64 numpy / scipy computations, and errors."""

import jax
import numpy as np
import pytest
import scipy.linalg

from lgeo_jax.analysis import (
    ANGLE_STATS,
    DeviceSAE,
    FiringCounts,
    LayerSAEs,
    NullCache,
    PromptCKA,
    PromptGrid,
    adapter_metrics,
    adapter_pass,
    angle_stats,
    compare,
    density_trends,
    improvement,
    live_rows,
    named_bootstrap,
    random_init_decoder,
    row_stats,
    subspace_resamples,
    table2,
    table4,
    table12,
)
from lgeo_jax.geometry import expected_max_cosine, mutual_nearest_fraction
from lgeo_jax.sae import SAE, SAEConfig, init_params
from lgeo_jax.stats import COUNT, resample_counts


def _jumprelu(seed: int, d: int, f: int) -> SAE:
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d),
              "W_dec": rng.normal(size=(f, d)).astype(np.float32) / np.sqrt(d),
              "b_enc": (0.1 * rng.normal(size=f)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32),
              "threshold": rng.uniform(0.0, 0.6, size=f).astype(np.float32)}
    params["b_enc"][:3] = 2.0  # three latents fire on a zero input (pre = b_enc > threshold)
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


def _cka(x, y, w=None):
    """Linear CKA in float64 with optional per-token weights (a resample's counts)."""
    w = np.ones(len(x)) if w is None else w
    xc, yc = x - (w[:, None] * x).sum(0) / w.sum(), y - (w[:, None] * y).sum(0) / w.sum()
    cxy, cxx, cyy = (xc * w[:, None]).T @ yc, (xc * w[:, None]).T @ xc, (yc * w[:, None]).T @ yc
    return np.sum(cxy**2) / np.sqrt(np.sum(cxx**2) * np.sum(cyy**2))


def _prompts(rng, n_prompts, lo=2, hi=12):
    """Token rows of `n_prompts` prompts (sparse ids, 2-11 tokens each), in a shuffled order."""
    sizes = rng.integers(lo, hi, n_prompts)
    ids = np.repeat(rng.choice(10_000, n_prompts, replace=False), sizes)
    return ids[rng.permutation(ids.size)]


# ------------------------------------------------------------------------------- Tables 4-8: token pass


def _data(seed=3, d=13, n_prompts=17):
    rng = np.random.default_rng(seed)
    ids = _prompts(rng, n_prompts)
    n = ids.size
    base = (rng.normal(size=(n, d)) * 2 + 4).astype(np.float32)
    delta = (rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) * 0.3 + 0.3 * base).astype(np.float32)
    delta[5] = 0.0  # a zero delta: left out of the mean of ratios, counted in the pooled sums
    return ids, base, delta, rng.permutation(n)


def _reference_metrics(ids, base, delta, partner, gs, sae, rows=None):
    """Tables 4-8 and the variance ratio in float64 numpy straight from their definitions (all tokens, or the
    token `rows` of a resample, repeated as drawn)."""
    rows = np.arange(ids.size) if rows is None else rows
    b64, d64, p64 = (x.astype(np.float64) for x in (base, delta, delta[partner]))
    mean_delta = d64.mean(0)  # the predictor is the full split's mean, fixed
    b64, d64, p64 = b64[rows], d64[rows], p64[rows]
    f_d, d_hat = _np_forward(gs, d64)
    f_b, b_hat = _np_forward(gs, b64)
    _, a_hat = _np_forward(gs, b64 + d64)
    f_p, _ = _np_forward(gs, p64)
    f0, zero_hat = _np_forward(gs, np.zeros((1, d64.shape[1])))
    _, s_hat = _np_forward(sae, d64)
    nz = np.linalg.norm(d64, axis=1) > 0
    centred = np.sum((d64 - d64.mean(0)) ** 2)

    def errors(x_hat):
        err = np.linalg.norm(d64 - x_hat, axis=1)
        return {"rel_l2": np.mean(err[nz] / np.linalg.norm(d64[nz], axis=1)),
                "rel_l2_pooled": np.sqrt(np.sum(err**2) / np.sum(d64**2)), "fvu": np.sum(err**2) / centred}

    out = {"table4.mean_norm": np.linalg.norm(d64, axis=1).mean(),
           "table4.ratio": np.linalg.norm(d64, axis=1).mean() / np.linalg.norm(b64, axis=1).mean(),
           "table11.variance_ratio": centred / np.sum((b64 - b64.mean(0)) ** 2)}
    sae_err = errors(s_hat)
    for name, x_hat in (("direct", d_hat), ("difference", a_hat - b_hat), ("zero_input", zero_hat),
                        ("mean_delta", mean_delta[None])):
        e = errors(x_hat)
        out |= {f"table5.{name}.{k}": v for k, v in e.items()}
        out |= {f"table7.{name}.{k}": 100 * (1 - sae_err[k] / v) for k, v in e.items()}
    out |= {f"table6.0.{k}": v for k, v in sae_err.items()}
    out["table6.0.l0"] = np.mean((_np_forward(sae, d64)[0] > 0).sum(1))
    zero_on = f0[0] > 0
    for variant, keep in (("all", np.ones_like(zero_on)), ("nonzero", ~zero_on)):
        on_d, on_b, on_p = (f_d > 0) & keep, (f_b > 0) & keep, (f_p > 0) & keep
        n_d, n_b, shared, n_p = on_d.sum(1), on_b.sum(1), (on_d & on_b).sum(1), on_p.sum(1)
        act, act_p = n_d > 0, n_p > 0
        out[f"table8.{variant}.overlap"] = np.mean(shared[act] / n_d[act])
        out[f"table8.{variant}.overlap_pooled"] = shared.sum() / n_d.sum()
        out[f"table8.{variant}.null_chance"] = np.mean(n_b[act] / gs.cfg.d_sae)
        out[f"table8.{variant}.null_shuffled"] = np.mean((on_p & on_b).sum(1)[act_p] / n_p[act_p])
        out[f"table8.{variant}.active_delta"] = n_d.mean()
    return out


def test_adapter_pass_metrics_and_intervals_against_float64_numpy():
    """Every Table 4-8 metric of three batches vs numpy over all rows; intervals vs resampling the rows by hand."""
    ids, base, delta, partner = _data()
    gs, sae = _jumprelu(0, base.shape[1], 31), _relu(1, base.shape[1], 19, scale=0.7)
    result = adapter_pass(base, delta, ids, partner, DeviceSAE(gs), {0: DeviceSAE(sae)}, batch_rows=29)
    assert result.zero_latents == 3
    got = adapter_metrics(result.sums.totals(), (0,))
    want = _reference_metrics(ids, base, delta, partner, gs, sae)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, err_msg=key)
    # The intervals: the same resamples of prompts, recomputed from the repeated token rows by numpy.
    intervals = named_bootstrap(result.sums, lambda t: adapter_metrics(t, (0,)), n_boot=30, seed=4, level=0.9)
    token_prompt = np.searchsorted(result.sums.ids, ids)
    keys = ("table5.difference.fvu", "table5.mean_delta.rel_l2", "table7.direct.rel_l2", "table8.all.overlap",
            "table8.nonzero.null_shuffled", "table11.variance_ratio")
    samples = {k: [] for k in keys}
    for counts in resample_counts(result.sums.n_prompts, 30, seed=4):
        for row in counts:
            rows = np.repeat(np.arange(ids.size), row[token_prompt])  # every token as often as its prompt was drawn
            ref = _reference_metrics(ids, base, delta, partner, gs, sae, rows)
            for k in keys:
                samples[k].append(ref[k])
    for k in keys:
        low, high = np.percentile(samples[k], [5, 95])
        np.testing.assert_allclose([intervals[k].low, intervals[k].high], [low, high], rtol=2e-4, err_msg=k)


def test_analysis_sae_passes_run_at_highest_matmul_precision():
    """Accelerators default to bf16 / TF32 matmul passes; every SAE forward of the analysis asks for HIGHEST."""
    import re

    import jax.numpy as jnp

    from lgeo_jax.analysis._tokens import _dictionary_terms, _sae_terms

    d, f = 6, 10
    gs, sae = DeviceSAE(_jumprelu(0, d, f)), DeviceSAE(_relu(1, d, f, 1.0))
    x = jnp.zeros((4, d))
    texts = [_sae_terms.lower(sae.params, sae.scale, x, sae.sae.cfg).as_text(),
             _dictionary_terms.lower(gs.params, gs.scale, x, x, x, jnp.zeros(d), jnp.zeros(f, bool), jnp.zeros(d),
                                     jnp.float32(0), cfg=gs.sae.cfg).as_text()]
    for text in texts:
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert dots and all(re.search(r"precision = \[HIGHEST, HIGHEST\]", line) for line in dots)


def test_improvement_is_one_minus_ratio():
    got = improvement({"rel_l2": 0.340, "rel_l2_pooled": 0.5, "fvu": 1.0}, {"rel_l2": 2.457, "rel_l2_pooled": 0.0,
                                                                            "fvu": 1.0})
    assert round(float(got["rel_l2"]), 1) == 86.2  # the paper's Table 7, L5 r4
    assert np.isnan(got["rel_l2_pooled"]) and got["fvu"] == 0.0  # undefined stays undefined, never a fake number


# -------------------------------------------------------------------------------------- Table 11: CKA


def test_prompt_cka_point_and_bootstrap_equal_weighted_numpy():
    rng = np.random.default_rng(0)
    ids = _prompts(rng, 23, 1, 9)
    x = rng.normal(size=(ids.size, 5)) + 10.0  # a mean far larger than the spread
    y = x @ rng.normal(size=(5, 3)) + rng.normal(size=(ids.size, 3))
    grid = PromptGrid.from_sample_index(ids)
    got = PromptCKA(grid, {"x": x, "y": y}).intervals({"xy": ("x", "y"), "xx": ("x", "x")}, n_boot=200, seed=3)
    np.testing.assert_allclose(got["xy"].point, _cka(x, y), rtol=1e-5)
    assert got["xx"].point == pytest.approx(1.0, abs=1e-6)
    token_prompt = np.searchsorted(grid.ids, ids)
    ref = [_cka(x, y, row[token_prompt].astype(float)) for c in resample_counts(grid.n_prompts, 200, seed=3)
           for row in c]
    np.testing.assert_allclose(got["xy"].samples, ref, rtol=1e-4)
    low, high = np.percentile(ref, [2.5, 97.5])  # the basic interval reflects the percentiles about the point
    np.testing.assert_allclose([got["xy"].low, got["xy"].high], [2 * _cka(x, y) - high, 2 * _cka(x, y) - low],
                               rtol=1e-4)


def test_prompt_cka_interval_covers_the_population_cka():
    """Coverage on clustered data with a known CKA (from 100,000 prompts): the basic interval covers it in 95% of
    150 repeats (binomial s.d. 1.8 points); the percentile interval of the same resamples, which inherits the
    small-sample upward bias of CKA twice, covers it in about 15%."""
    d = 16
    mixing = np.random.default_rng(0).normal(size=(d, d)) * 0.3

    def sample(rng, n_prompts):
        sizes = rng.integers(5, 16, n_prompts)
        ids = np.repeat(np.arange(n_prompts), sizes)
        x = rng.normal(size=(n_prompts, d))[ids] + rng.normal(size=(ids.size, d))  # prompt effect + token noise
        y = x @ mixing + 1.5 * rng.normal(size=(ids.size, d)) + rng.normal(size=(n_prompts, d))[ids]
        return ids, x, y

    truth = _cka(*sample(np.random.default_rng(99), 100_000)[1:])
    rng = np.random.default_rng(1)
    basic = percentile = 0
    for repeat in range(150):
        ids, x, y = sample(rng, 100)
        iv = PromptCKA(PromptGrid.from_sample_index(ids), {"x": x, "y": y}).intervals(
            {"xy": ("x", "y")}, n_boot=300, seed=repeat)["xy"]
        basic += bool(iv.low <= truth <= iv.high)
        low, high = np.percentile(iv.samples, [2.5, 97.5])
        percentile += bool(low <= truth <= high)
    assert 0.91 <= basic / 150 <= 0.98, basic
    assert percentile / 150 < 0.5, percentile


def test_prompt_cka_gram_in_column_chunks_is_exact(monkeypatch):
    import lgeo_jax.analysis._cka as cka_module

    rng = np.random.default_rng(1)
    ids = _prompts(rng, 9)
    x, y = rng.normal(size=(ids.size, 12)), rng.normal(size=(ids.size, 12))
    grid = PromptGrid.from_sample_index(ids)
    whole = PromptCKA(grid, {"x": x, "y": y}).gram("x", "y")
    monkeypatch.setattr(cka_module, "_CHUNK_BYTES", 4 * 9 * grid.slots.shape[1] * 12 * 3)  # 3 columns a chunk
    chunked = PromptCKA(grid, {"x": x, "y": y}).gram("x", "y")
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    per_prompt = [xc[ids == p].T @ yc[ids == p] for p in grid.ids]
    np.testing.assert_allclose(whole, [[np.sum(a * b) for b in per_prompt] for a in per_prompt], rtol=1e-4,
                               atol=1e-6)


# -------------------------------------------------------------------------------- Tables 9-10: geometry


def _numpy_top_subspace(rows: np.ndarray, k: int, weights=None) -> np.ndarray:
    rows = rows[np.linalg.norm(rows, axis=1) > 0].astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    if weights is not None:
        unit = unit * np.sqrt(weights)[:, None]
    return np.linalg.svd(unit, full_matrices=False)[2][:k]  # [K, D]


def test_compare_against_numpy_and_scipy():
    rng = np.random.default_rng(2)
    d = 17
    a = rng.normal(size=(29, d)) * rng.uniform(0.5, 3, size=(29, 1))
    b = rng.normal(size=(37, d))
    b[:6] = a[:6] + 0.05 * rng.normal(size=(6, d))  # some shared directions
    live = rng.random(29) > 0.3
    got = compare(live_rows(a, live), live_rows(b), [2, 4])
    a64 = a[live] / np.linalg.norm(a[live], axis=1, keepdims=True)
    b64 = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = a64 @ b64.T
    np.testing.assert_allclose(got.rows[:, 0], cos.max(axis=1), atol=2e-6)
    np.testing.assert_allclose(got.rows[:, 1], np.abs(cos).max(axis=1), atol=2e-6)
    mutual = cos.argmax(axis=0)[cos.argmax(axis=1)] == np.arange(live.sum())  # b's pick of a's pick is a
    np.testing.assert_array_equal(got.rows[:, 2], mutual)
    assert got.rows[:, 2].mean() == pytest.approx(float(mutual_nearest_fraction(live_rows(a, live), b)))
    for k in (2, 4):
        want = np.degrees(scipy.linalg.subspace_angles(_numpy_top_subspace(a[live], k).T,
                                                       _numpy_top_subspace(b, k).T))[::-1]  # ascending
        np.testing.assert_allclose(got.angles[k], want, atol=1e-3)
    stats = row_stats(got.rows)
    np.testing.assert_allclose(stats, [cos.max(1).mean(), np.median(cos.max(1)), 100 * np.mean(cos.max(1) < 0.3),
                                       100 * np.mean(cos.max(1) > 0.7), np.abs(cos).max(1).mean(), mutual.mean()],
                               rtol=1e-5)


def test_subspace_resamples_equal_a_numpy_loop():
    """The latent bootstrap of Table 10: each resample's weighted top-k subspace, by numpy SVD and scipy angles."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 9)) * np.linspace(3, 0.5, 9)  # an anisotropic decoder: a defined top-k subspace
    a[::7] = 0.0  # dead rows take no part
    basis_b = _numpy_top_subspace(rng.normal(size=(30, 9)) * np.linspace(2, 1, 9), 4)
    got = subspace_resamples(live_rows(a), basis_b, [2, 4], n_boot=25, seed=6, near_orthogonal=70, aligned=30)
    live = a[np.any(a != 0, axis=1)]
    for k in (2, 4):
        want = [angle_stats(np.degrees(scipy.linalg.subspace_angles(_numpy_top_subspace(live, k, row).T,
                                                                    basis_b[:k].T))[::-1], 70, 30)
                for c in resample_counts(live.shape[0], 25, seed=6) for row in c]
        np.testing.assert_allclose(got[k], want, atol=2e-3)
    assert got[4].shape == (25, len(ANGLE_STATS))


def test_subspace_interval_covers_the_population_angles():
    """Coverage of Table 10's latent bootstrap: decoders of 256 rows drawn from an anisotropic population, whose
    top-8 subspace (from 400,000 rows) has a known mean angle with a fixed dictionary subspace. The percentile
    interval (the one reported) covers it in ~95% of 150 repeats (binomial s.d. 1.8 points); the basic interval,
    right for CKA, covers it in ~80% here: this statistic is not biased the way CKA is."""
    d, k = 32, 8
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(d, d)) * np.linspace(2, 0.3, d)

    def rows(rng, n):
        u = rng.normal(size=(n, d)) @ mixing.T
        return (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)

    population = rows(np.random.default_rng(9), 400_000).astype(np.float64)
    top = np.linalg.eigh(population.T @ population)[1][:, ::-1][:, :k].T  # [k, d]
    dictionary = _numpy_top_subspace(rng.normal(size=(200, d)) * np.linspace(1.5, 0.5, d), k)
    truth = np.degrees(scipy.linalg.subspace_angles(top.T, dictionary.T)).mean()
    percentile = basic = 0
    for repeat in range(150):
        a = rows(rng, 256)
        point = np.degrees(scipy.linalg.subspace_angles(_numpy_top_subspace(a, k).T, dictionary.T)).mean()
        means = subspace_resamples(a, dictionary, [k], n_boot=100, seed=repeat, near_orthogonal=70, aligned=30)[k][:, 0]
        low, high = np.percentile(means, [2.5, 97.5])
        percentile += bool(low <= truth <= high)
        basic += bool(2 * point - high <= truth <= 2 * point - low)
    assert 0.91 <= percentile / 150 <= 0.98, percentile
    assert basic < percentile


def test_random_nulls_match_their_exact_values():
    nulls = NullCache(20, 4, near_orthogonal=70, aligned=30)
    null = nulls.random_directions(200, 256, 300, 32)
    assert null.stats.shape == (20, 6) and null.first_rows.shape == (200, 3)
    exact = expected_max_cosine(300, 32)
    se = null.stats[:, 0].std() / np.sqrt(20)
    assert abs(null.stats[:, 0].mean() - exact) < 5 * se + 1e-3
    assert abs(null.stats[:, 5].mean() - 300 / (300 + 200 - 1)) < 0.03  # mutual-nearest: n / (n + m - 1)
    assert nulls.random_directions(200, 256, 300, 32) is null  # cached
    stats, angles = nulls.random_subspaces(4, 32)
    assert stats.shape == (20, 4) and angles.shape == (20, 4) and np.all((angles >= 0) & (angles <= 90))
    w = random_init_decoder(50, 32, seed=0)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(w, random_init_decoder(50, 32, seed=0, draw=1))  # every draw is a new init


def test_firing_counts_live_rule():
    counts = FiringCounts(np.array([0, 1, 5, 100]), n=1000)
    np.testing.assert_array_equal(counts.live(0.0), [False, True, True, True])
    np.testing.assert_array_equal(counts.live(0.004), [False, False, True, True])  # density > 0.4%
    assert counts.result(0.004)["dead_fraction"] == 0.5
    with pytest.raises(ValueError, match="no tokens"):
        FiringCounts.zeros(3).live(0.0)


def test_density_trend_slopes_and_verdicts():
    """L0 rising with log2(rank) at every layer and flat over depth: slopes as numpy's polyfit, verdicts +1 / 0."""
    rng = np.random.default_rng(7)
    ids = np.sort(rng.choice(1000, 60, replace=False))
    tokens = rng.integers(5, 20, 60).astype(float)
    ranks, layers, adapters = [4, 8, 16], [1, 3], ["r4", "r8", "r16"]
    per_layer = {}
    for layer in layers:
        per_layer[layer] = {"prompt_ids": ids, "prompt_tokens": tokens}
        for a, r in zip(adapters, ranks, strict=True):
            per_prompt_l0 = 10 + 3 * np.log2(r) + rng.normal(0, 2, 60)  # 3 latents more per doubling of the rank
            per_layer[layer][f"{a}/prompt_l0"] = per_prompt_l0 * tokens
    got = density_trends(adapters, ranks, layers, per_layer, n_boot=200, seed=0, level=0.95)
    for layer in layers:
        l0 = [per_layer[layer][f"{a}/prompt_l0"].sum() / tokens.sum() for a in adapters]
        assert got["rank_slope"][f"L{layer}"]["value"] == pytest.approx(np.polyfit(np.log2(ranks), l0, 1)[0])
        assert got["rank_slope"][f"L{layer}"]["vs_null"] == 1
    assert {got["depth_slope"][a]["vs_null"] for a in adapters} == {0}
    other = {**per_layer, 3: {**per_layer[3], "prompt_ids": ids + 1}}
    with pytest.raises(ValueError, match="other prompts"):
        density_trends(adapters, ranks, layers, other, n_boot=100, seed=0, level=0.95)


# ------------------------------------------------------------------------------------------ bad inputs


def test_layer_saes_width_mismatch_names_the_sae():
    delta = {"r4": {0: _relu(1, 13, 19, 1.0), 1: _relu(2, 12, 19, 1.0)}}
    saes = LayerSAEs(dictionary=_jumprelu(0, 13, 31), delta=delta)
    with pytest.raises(ValueError, match="layer 7: delta SAE r4 seed 1 has d_in=12, but the corpus has d_model=13"):
        saes.check(7, 13)


def test_table2_table4_and_table12_parsing():
    summary = {"adapters": {"r4": {"rank": 4, "trainable_params": 4_472_832, "final_train_loss": 1.13}}}
    t2 = table2(summary, ["r4"], 9_241_705_984)
    assert t2["adapters"]["r4"]["pct_of_total"] == pytest.approx(0.0484, abs=1e-4)  # the paper's 0.048%
    with pytest.raises(ValueError, match="no adapter 'r8'"):
        table2(summary, ["r8"], 1)
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


def test_prompt_grid_layout():
    ids = np.array([7, 3, 7, 9, 3, 7])
    grid = PromptGrid.from_sample_index(ids)
    np.testing.assert_array_equal(grid.ids, [3, 7, 9])
    np.testing.assert_array_equal(grid.slots, [[1, 4, -1], [0, 2, 5], [3, -1, -1]])
    x = np.arange(6.0)[:, None]
    np.testing.assert_array_equal(grid.pad(x)[..., 0], [[1, 4, 0], [0, 2, 5], [3, 0, 0]])
    assert COUNT == "n"
