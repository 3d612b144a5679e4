"""Statistics machinery (lgeo_jax.stats) against slow loop references and on data with a known truth.

The coverage test is a calibration check, so it needs enough repeats for its window to mean something:
with 200 repeats the binomial s.d. of a 95% coverage is 1.5 points and a correct method would leave
93-97% for about one seed in four; 1000 repeats (s.d. 0.7) make the window a real test.
"""

import json

import numpy as np
import pytest

from lgeo_jax.stats import (
    COUNT,
    MIN_NULL_DRAWS,
    Interval,
    Method,
    PromptSums,
    bias_corrected,
    bootstrap,
    bootstrap_groups,
    bootstrap_items,
    interval_from_samples,
    null_interval,
    resample_counts,
    vs_null,
)

# ------------------------------------------------------------------------------------------ accumulation


def _token_rows(rng, n_rows, prompt_ids):
    """Token rows in random order: prompt ids [T] and quantities of three per-token shapes."""
    ids = rng.choice(prompt_ids, size=n_rows)  # [T]
    return ids, {"err_sq": rng.random(n_rows), "moments": rng.normal(size=(n_rows, 3)),
                 "outer": rng.normal(size=(n_rows, 2, 2))}


def _reference_sums(ids, quantities):
    """np.add.at over a dense id range, then only the ids that occur (the slow, obvious way)."""
    present = np.unique(ids)
    dense = {name: np.zeros((ids.max() + 1, *value.shape[1:])) for name, value in quantities.items()}
    for name, value in quantities.items():
        np.add.at(dense[name], ids, value)
    out = {name: value[present] for name, value in dense.items()}
    out[COUNT] = np.bincount(ids)[present].astype(np.float64)
    return present, out


def test_prompt_sums_match_add_at_and_merge_in_halves_equals_one_pass():
    rng = np.random.default_rng(0)
    prompt_ids = rng.choice(50_000, size=37, replace=False)  # sparse dataset indices, like sample_index
    # The first 250 rows use prompts 0-24, the rest prompts 15-36: halves share some prompts, not all.
    head, tail = _token_rows(rng, 250, prompt_ids[:25]), _token_rows(rng, 351, prompt_ids[15:])
    ids = np.concatenate([head[0], tail[0]])  # [601]
    quantities = {name: np.concatenate([head[1][name], tail[1][name]]) for name in head[1]}

    at_once = PromptSums()
    for start in range(0, 601, 97):  # batches that split prompts across them
        at_once.add(ids[start:start + 97], {k: v[start:start + 97] for k, v in quantities.items()})
    ref_ids, ref = _reference_sums(ids, quantities)
    np.testing.assert_array_equal(at_once.ids, ref_ids)
    assert set(at_once.sums) == set(ref) and at_once.names == ("err_sq", "moments", "outer")
    for name in ref:
        np.testing.assert_allclose(at_once.sums[name], ref[name], rtol=1e-12, atol=1e-12)

    # Halves see overlapping and disjoint prompts; merging them (either way round) equals one pass.
    first = PromptSums().add(ids[:250], {k: v[:250] for k, v in quantities.items()})
    second = PromptSums().add(ids[250:], {k: v[250:] for k, v in quantities.items()})
    assert 0 < len(np.intersect1d(first.ids, second.ids)) < min(first.n_prompts, second.n_prompts)
    for merged in (PromptSums().merge(first).merge(second), PromptSums().merge(second).merge(first)):
        np.testing.assert_array_equal(merged.ids, at_once.ids)
        for name in ref:
            np.testing.assert_allclose(merged.sums[name], at_once.sums[name], rtol=1e-12, atol=1e-12)
    assert first.merge(PromptSums()) is first  # merging an empty accumulator changes nothing
    totals = at_once.totals()
    assert totals[COUNT] == 601
    np.testing.assert_allclose(totals["moments"], quantities["moments"].sum(axis=0), rtol=1e-12)


def test_prompt_sums_reject_inconsistent_input():
    acc = PromptSums().add(np.array([3, 3, 5]), {"a": np.ones(3)})
    with pytest.raises(ValueError, match="differ from the accumulated"):
        acc.add(np.array([3]), {"b": np.ones(1)})
    with pytest.raises(ValueError, match="per-token shape"):
        acc.add(np.array([3]), {"a": np.ones((1, 2))})
    with pytest.raises(ValueError, match="reserved"):
        acc.add(np.array([3]), {COUNT: np.ones(1)})
    with pytest.raises(ValueError, match="filler rows"):
        acc.add(np.array([-1]), {"a": np.ones(1)})
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(np.array([3]), {"a": np.array([np.nan])})
    with pytest.raises(ValueError, match="leading rows"):
        acc.add(np.array([3, 4]), {"a": np.ones(3)})
    with pytest.raises(ValueError, match="integer"):
        acc.add(np.array([3.0]), {"a": np.ones(1)})
    with pytest.raises(ValueError, match="strictly increasing"):
        PromptSums(ids=np.array([2, 1]), sums={COUNT: np.ones(2)})
    np.testing.assert_array_equal(acc.sums[COUNT], [2.0, 1.0])  # the failed adds left the state alone


# ------------------------------------------------------------------------------ prompt bootstrap: coverage

MU = 0.3  # the true mean of every token


def _clustered(rng, n_prompts=200, rho=0.5):
    """Tokens x = MU + prompt effect + AR(1) noise along the prompt; 2-30 tokens per prompt, rows shuffled."""
    sizes = rng.integers(2, 31, n_prompts)  # [P]
    effects = rng.normal(0.0, 1.0, n_prompts)  # [P] random effects: tokens of one prompt share one
    eta = rng.normal(size=(n_prompts, sizes.max()))  # [P, L]
    noise = np.empty_like(eta)  # [P, L] AR(1) within a prompt: neighbours correlate too
    noise[:, 0] = eta[:, 0]
    for t in range(1, eta.shape[1]):
        noise[:, t] = rho * noise[:, t - 1] + np.sqrt(1.0 - rho**2) * eta[:, t]
    valid = np.arange(eta.shape[1]) < sizes[:, None]  # [P, L]
    x = (MU + effects[:, None] + noise)[valid]  # [T], grouped by prompt
    ids = np.repeat(np.arange(n_prompts) * 7 + 3, sizes)  # [T]
    order = rng.permutation(x.size)
    return ids[order], x[order]


def _mean(totals):
    return totals["x"] / totals[COUNT]


def _coverage(n_repeats, n_boot, *, by_token):
    rng = np.random.default_rng(2024)
    covered, widths = 0, []
    for repeat in range(n_repeats):
        ids, x = _clustered(rng)
        if by_token:  # naive: every token its own unit, as if tokens were independent
            ids = np.arange(x.size)
        interval = bootstrap(PromptSums().add(ids, {"x": x}).sums, _mean, n_boot=n_boot, seed=repeat)
        covered += bool(interval.low <= MU <= interval.high)
        widths.append(float(interval.high - interval.low))
    return covered / n_repeats, float(np.mean(widths))


def test_prompt_bootstrap_covers_the_true_mean_and_token_bootstrap_does_not():
    coverage, width = _coverage(1000, 1000, by_token=False)
    assert 0.93 <= coverage <= 0.97, coverage
    # The same data resampled token by token: the interval ignores the within-prompt correlation, is far
    # too narrow, and misses the truth far more often than 5% of the time (it covers about 43% here).
    naive_coverage, naive_width = _coverage(200, 200, by_token=True)
    assert naive_coverage < 0.8, naive_coverage
    assert naive_width < 0.6 * width, (naive_width, width)


# ------------------------------------------------------------------------- prompt bootstrap: exactness


def _loop_bootstrap(per_prompt, statistic, n_boot, seed, percentiles):
    """The documented scheme, written out: draw P prompts with replacement, sum their rows, percentiles."""
    n = next(iter(per_prompt.values())).shape[0]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        samples.append(statistic({name: value[idx].sum(axis=0) for name, value in per_prompt.items()}))
    samples = np.array(samples)
    low, high = np.percentile(samples, percentiles, axis=0)
    return samples, low, high


def _pooled_ratio(totals):
    return np.sqrt(totals["err_sq"] / totals["norm_sq"])


def test_bootstrap_of_pooled_ratio_equals_loop_reference():
    rng = np.random.default_rng(1)
    per_prompt = {"err_sq": rng.random(13) * 0.2, "norm_sq": 1.0 + rng.random(13)}  # [P] each
    samples, low, high = _loop_bootstrap(per_prompt, _pooled_ratio, 57, 5, [5, 95])  # level 0.9
    interval = bootstrap(per_prompt, _pooled_ratio, n_boot=57, seed=5, level=0.9, keep_samples=True)
    np.testing.assert_allclose(interval.samples, samples, rtol=1e-12)
    np.testing.assert_allclose([interval.low, interval.high], [low, high], rtol=1e-12)
    np.testing.assert_allclose(interval.point, np.sqrt(per_prompt["err_sq"].sum() / per_prompt["norm_sq"].sum()),
                               rtol=1e-12)
    assert interval.method is Method.PROMPT_BOOTSTRAP and (interval.n_draws, interval.n_units) == (57, 13)
    # Chunking (here one resample per chunk) and the per-resample path give the same resamples.
    for kwargs in ({"chunk_bytes": 1}, {"vectorized": False}):
        other = bootstrap(per_prompt, _pooled_ratio, n_boot=57, seed=5, level=0.9, keep_samples=True, **kwargs)
        np.testing.assert_allclose(other.samples, interval.samples, rtol=1e-12)
    assert bootstrap(per_prompt, _pooled_ratio, n_boot=57, seed=5, level=0.9).samples is None


def test_bootstrap_of_cka_from_moment_sums():
    """A statistic of matrix-valued totals; its point value is the exact linear CKA of all tokens."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 11, size=233)  # [T]
    x = rng.normal(size=(233, 3))  # [T, 3]
    y = x @ rng.normal(size=(3, 2)) + 0.5 * rng.normal(size=(233, 2))  # [T, 2]
    acc = PromptSums().add(ids, {"x": x, "y": y, "xx": np.einsum("tp,to->tpo", x, x),
                                 "yy": np.einsum("tq,tr->tqr", y, y), "xy": np.einsum("tp,tq->tpq", x, y)})

    def cka(t):  # broadcasts over any leading resample axis
        n = t[COUNT][..., None, None]
        cxx = t["xx"] - t["x"][..., :, None] * t["x"][..., None, :] / n  # [..., 3, 3]
        cyy = t["yy"] - t["y"][..., :, None] * t["y"][..., None, :] / n  # [..., 2, 2]
        cxy = t["xy"] - t["x"][..., :, None] * t["y"][..., None, :] / n  # [..., 3, 2]
        frob = lambda m: np.sum(m**2, axis=(-2, -1))
        return frob(cxy) / np.sqrt(frob(cxx) * frob(cyy))

    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    exact = np.sum((xc.T @ yc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    interval = bootstrap(acc.sums, cka, n_boot=64, seed=0, keep_samples=True)
    np.testing.assert_allclose(interval.point, exact, rtol=1e-10)
    assert interval.shape == () and interval.low < exact < interval.high
    looped = bootstrap(acc.sums, cka, n_boot=64, seed=0, keep_samples=True, vectorized=False)
    np.testing.assert_allclose(looped.samples, interval.samples, rtol=1e-10)


def test_bootstrap_vector_statistic_and_shape_errors():
    rng = np.random.default_rng(3)
    per_prompt = {"err_sq": rng.random((20, 4)), "norm_sq": 1.0 + rng.random((20, 4))}  # 4 SAEs at once
    interval = bootstrap(per_prompt, _pooled_ratio, n_boot=100, seed=1)
    assert interval.shape == (4,)
    single = bootstrap({k: v[:, 2] for k, v in per_prompt.items()}, _pooled_ratio, n_boot=100, seed=1)
    np.testing.assert_allclose([interval[2].point, interval[2].low, interval[2].high],
                               [single.point, single.low, single.high], rtol=1e-12)
    # A "vectorized" statistic that sums over the resample axis is caught by its output shape.
    with pytest.raises(ValueError, match="leading resample axis"):
        bootstrap(per_prompt, lambda t: np.sum(t["err_sq"]) / np.sum(t["norm_sq"]), n_boot=10)
    with pytest.raises(ValueError, match="leading prompt axis"):
        bootstrap({"a": np.ones(5), "b": np.ones(6)}, lambda t: t["a"] / t["b"])
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap({"a": np.ones(1)}, lambda t: t["a"])


def test_bootstrap_undefined_resamples_give_undefined_bounds():
    """Only prompt 0 has a nonzero denominator: resamples without it have no ratio, so no interval."""
    per_prompt = {"shared": np.array([1.0, 0.0, 0.0]), "active": np.array([2.0, 0.0, 0.0])}
    with np.errstate(invalid="ignore", divide="ignore"):
        interval = bootstrap(per_prompt, lambda t: t["shared"] / t["active"], n_boot=50)
    assert interval.point == 0.5 and np.isnan(interval.low) and np.isnan(interval.high)
    assert interval.to_json()["low"] is None
    assert vs_null(interval, null_interval(np.zeros(MIN_NULL_DRAWS))) == 0


# ----------------------------------------------------------------------------------------- item bootstrap


@pytest.mark.parametrize("statistic", [np.mean, np.median, lambda x, axis: np.mean(x < 0.3, axis=axis)],
                         ids=["mean", "median", "fraction_below"])
def test_item_bootstrap_equals_loop_reference(statistic):
    values = np.random.default_rng(4).beta(2.0, 5.0, size=41)  # e.g. per-latent max-cosines
    rng = np.random.default_rng(9)
    samples = np.array([statistic(values[rng.integers(0, 41, size=41)], axis=0) for _ in range(73)])
    interval = bootstrap_items(values, statistic, n_boot=73, seed=9, keep_samples=True, chunk_bytes=2000)
    np.testing.assert_allclose(interval.samples, samples, rtol=1e-12)
    np.testing.assert_allclose([interval.low, interval.high], np.percentile(samples, [2.5, 97.5]), rtol=1e-12)
    np.testing.assert_allclose(interval.point, statistic(values, axis=0), rtol=1e-12)
    assert interval.method is Method.ITEM_BOOTSTRAP and interval.n_units == 41


def test_item_bootstrap_per_column_and_errors():
    values = np.random.default_rng(5).normal(size=(30, 3)) + np.array([0.0, 10.0, -10.0])  # [N, 3]
    interval = bootstrap_items(values, n_boot=200)
    assert interval.shape == (3,)
    assert np.all(interval.low < values.mean(axis=0)) and np.all(values.mean(axis=0) < interval.high)
    with pytest.raises(ValueError, match="item axis"):
        bootstrap_items(values, lambda x, axis: np.mean(x), n_boot=10)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_items(values, n_boot=1)


def test_resample_counts_are_the_draws_of_both_bootstraps():
    """One scheme: the counts of `resample_counts` are the bincounts of `bootstrap_items`' index draws, chunk size
    aside, and `bootstrap` on per-unit sums is the same resampling (so intervals built from them are paired)."""
    values = np.random.default_rng(11).normal(size=23)
    items = bootstrap_items(values, n_boot=40, seed=3, keep_samples=True)
    counts = np.concatenate(list(resample_counts(23, 40, seed=3, chunk_bytes=1)))  # one resample per chunk
    assert counts.shape == (40, 23) and np.all(counts.sum(axis=1) == 23)
    np.testing.assert_allclose(counts @ values / 23, items.samples, rtol=1e-12)
    sums = bootstrap({"x": values, "n": np.ones(23)}, lambda t: t["x"] / t["n"], n_boot=40, seed=3, keep_samples=True)
    np.testing.assert_allclose(sums.samples, items.samples, rtol=1e-12)


def test_bootstrap_groups_equals_its_two_stage_loop():
    rng = np.random.default_rng(12)
    points = rng.normal(size=(3, 2))  # [G, S]: 3 seeds, 2 statistics
    samples = points[:, None] + 0.1 * rng.normal(size=(3, 50, 2))  # [G, B, S] each seed's item replicates
    got = bootstrap_groups(points, samples, seed=7, keep_samples=True)
    loop = np.random.default_rng(7)
    groups, replicates = loop.integers(0, 3, size=(50, 3)), loop.integers(0, 50, size=(50, 3))
    want = np.array([[samples[g, r] for g, r in zip(gs, rs, strict=True)] for gs, rs in zip(groups, replicates,
                                                                                          strict=True)]).mean(axis=1)
    np.testing.assert_allclose(got.samples, want, rtol=1e-12)
    np.testing.assert_allclose(got.point, points.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose([got.low, got.high], np.percentile(want, [2.5, 97.5], axis=0), rtol=1e-12)
    assert got.method is Method.GROUP_BOOTSTRAP and got.n_units == 3
    one = bootstrap_groups(points[:1], samples[:1])  # one group: its own replicates' percentiles
    np.testing.assert_allclose([one.low, one.high], np.percentile(samples[0], [2.5, 97.5], axis=0), rtol=1e-12)
    # Seeds that disagree widen the interval beyond any single seed's latent noise.
    apart = bootstrap_groups(np.array([[0.0], [1.0]]), np.array([[[0.0]] * 50, [[1.0]] * 50]) + 0.01, seed=0)
    assert apart.low[0] < 0.1 and apart.high[0] > 0.9
    with pytest.raises(ValueError, match=r"\[G, B, \*S\]"):
        bootstrap_groups(points, samples[:, :, :1])


def test_basic_interval_reflects_the_percentiles_and_recentres_a_biased_statistic():
    samples = np.random.default_rng(13).normal(1.3, 0.1, size=(400,))  # resamples shifted by a bias of +0.3
    basic = interval_from_samples(1.0, samples, level=0.95, method=Method.BASIC_PROMPT_BOOTSTRAP, n_units=50,
                                  basic=True)
    low, high = np.percentile(samples, [2.5, 97.5])
    np.testing.assert_allclose([basic.low, basic.high], [2.0 - high, 2.0 - low], rtol=1e-12)
    assert bias_corrected(1.0, samples) == pytest.approx(2.0 - samples.mean())
    assert basic.low < 0.7 < basic.high  # centred near 0.7: the point less its bias, which percentiles miss
    exact = Interval.exact(0.0)
    assert exact.method is Method.EXACT and vs_null(basic, exact) == 1


# ----------------------------------------------------------------------------------- nulls and verdicts


def test_null_interval_is_mean_and_np_percentile():
    draws = np.random.default_rng(6).normal(size=(50, 3))  # [R, 3]
    null = null_interval(draws, keep_samples=True)
    np.testing.assert_array_equal([null.low, null.high], np.percentile(draws, [2.5, 97.5], axis=0))
    np.testing.assert_allclose(null.point, draws.mean(axis=0), rtol=1e-12)
    assert null.method is Method.MONTE_CARLO and null.n_draws == 50 and null.samples.shape == (50, 3)
    narrow = null_interval(draws[:, 0], level=0.8)
    np.testing.assert_array_equal([narrow.low, narrow.high], np.percentile(draws[:, 0], [10, 90]))
    with pytest.raises(ValueError, match=">= 20"):
        null_interval(draws[:MIN_NULL_DRAWS - 1])
    with pytest.raises(ValueError, match="not finite"):
        null_interval(np.full(MIN_NULL_DRAWS, np.nan))


def _interval(low, high):
    low, high = np.asarray(low, float), np.asarray(high, float)
    return Interval(point=(low + high) / 2, low=low, high=high, level=0.95, method=Method.PROMPT_BOOTSTRAP,
                    n_draws=1000, n_units=100)


@pytest.mark.parametrize(("estimate", "null", "verdict"), [
    ((0.5, 0.6), (0.0, 0.1), 1),  # entirely above
    ((0.0, 0.1), (0.5, 0.6), -1),  # entirely below
    ((0.05, 0.55), (0.5, 0.6), 0),  # overlapping
    ((0.0, 0.7), (0.3, 0.4), 0),  # the null inside the estimate's interval
    ((0.1, 0.5), (0.5, 0.6), 0),  # touching counts as overlapping
    ((0.6, 0.7), (0.5, 0.6), 0),
    ((np.nan, np.nan), (0.0, 0.1), 0),  # undefined estimate interval: never a finding
])
def test_vs_null(estimate, null, verdict):
    result = vs_null(_interval(*estimate), _interval(*null))
    assert result == verdict and type(result) is int


def test_vs_null_elementwise():
    estimate = _interval([0.5, 0.0, 0.2], [0.6, 0.1, 0.4])
    null = _interval([0.0, 0.3, 0.3], [0.1, 0.4, 0.5])
    np.testing.assert_array_equal(vs_null(estimate, null), [1, -1, 0])
    assert vs_null(estimate[1], null[1]) == -1


def test_interval_is_frozen_and_json_ready():
    interval = bootstrap_items(np.arange(10.0), n_boot=20, keep_samples=True)
    payload = json.loads(json.dumps(interval.to_json()))
    assert payload["method"] == "item_bootstrap" and payload["point"] == 4.5 and len(payload["samples"]) == 20
    assert set(payload) == {"point", "low", "high", "level", "method", "n_draws", "n_units", "samples"}
    with pytest.raises(ValueError):
        interval.low[...] = 0.0  # read-only arrays
    with pytest.raises(ValueError, match="one shape"):
        Interval(point=np.zeros(2), low=np.zeros(3), high=np.zeros(3), level=0.95, method=Method.MONTE_CARLO,
                 n_draws=20, n_units=20)
