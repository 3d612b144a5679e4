"""LoRA-weight linkage (`lgeo_jax.analysis._lora_span`) and Table 9's one-to-one matching, against numpy float64 /
scipy references and planted truths (issue 16, items 2-3)."""

import jax
import numpy as np
import pytest
import scipy.linalg

from lgeo_jax.analysis import (
    AnalysisConfig,
    FiringCounts,
    LayerSAEs,
    NullCache,
    PromptCKA,
    PromptGrid,
    analyze_layer,
    firing_key,
    lora_span,
    span_record,
)
from lgeo_jax.lora import AdapterSpec, init_adapters, load_adapter, save_adapter
from lgeo_jax.model import Gemma2Config
from lgeo_jax.sae import SAE, SAEConfig
from lgeo_jax.stats import resample_counts

# odd sizes: the o_proj input (n_heads * head_dim = 18) differs from d_model, the MLP width from both
CFG = Gemma2Config(vocab_size=11, d_model=29, n_heads=3, n_kv_heads=1, head_dim=6, mlp_dim=37, n_layers=4)
RTOL = 1e-4
CONFIG = AnalysisConfig(subspace_k=5, k_sweep=(5,), n_boot=200, subspace_boot=20, null_samples=20)


def _adapters(targets=("q", "o", "down"), rank=3, seed=0, **spec):
    specs = [AdapterSpec(rank=rank, alpha=2.0 * rank, targets=targets, name=f"r{rank}", **spec)]
    return init_adapters(CFG, specs, seed=seed, random_b=True)


def _peft_products(adapters, layer):
    """Scaled PEFT-layout updates s B A [D, In] of o_proj and down_proj at blocks <= layer, float64."""
    out = []
    for t in ("o", "down"):
        if t not in adapters.targets:
            continue
        a, b, scale = (np.asarray(x, np.float64) for x in adapters.factors(t))
        out += [scale[i, 0] * b[i, 0].T @ a[i, 0].T for i in range(layer + 1)]  # B = b^T [D, R], A = a^T [R, In]
    return out


def _projector(basis_rows):
    return basis_rows.T @ basis_rows


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_span_basis_equals_scipy_orth_of_the_stacked_products(layer):
    adapters = _adapters(rank_pattern=(("down_proj", 2),), layers=(0, 2, 3))  # block 1 untransformed
    span = lora_span(adapters, layer, CFG.d_model, rtol=RTOL)
    ref = scipy.linalg.orth(np.hstack(_peft_products(adapters, layer)), rcond=RTOL)  # [D, S]
    assert span.dim == ref.shape[1] == min(CFG.d_model, 5 * len([b for b in (0, 2, 3) if b <= layer]))
    np.testing.assert_allclose(span.basis @ span.basis.T, np.eye(span.dim), atol=1e-12)
    np.testing.assert_allclose(_projector(span.basis), ref @ ref.T, atol=1e-10)
    assert span.layers == tuple(range(layer + 1)) and span.targets == ("o", "down") and span.rank == 3


def test_span_drops_repeated_and_zero_directions_and_refuses_other_models():
    adapters = _adapters(targets=("o",), rank=4)
    a, b, scale = adapters.factors("o")
    b = b.at[1].set(b[0]).at[2, :, 3].set(0.0)  # block 1 writes where block 0 does; block 2 only 3 directions
    adapters = type(adapters)(adapters.specs, {"o": (a, b, scale)})
    span = lora_span(adapters, 2, CFG.d_model, rtol=RTOL)
    assert span.dim == 4 + 3
    ref = scipy.linalg.orth(np.hstack(_peft_products(adapters, 2)), rcond=RTOL)
    np.testing.assert_allclose(_projector(span.basis), ref @ ref.T, atol=1e-10)
    assert lora_span(_adapters(targets=("q", "v")), 3, CFG.d_model, rtol=RTOL).dim == 0  # no direct write
    with pytest.raises(ValueError, match="o_proj writes 29-wide outputs but the residual stream has d_model 31"):
        lora_span(adapters, 1, 31, rtol=RTOL)


def test_span_of_a_saved_and_loaded_peft_adapter(tmp_path):
    adapters = _adapters()
    save_adapter(adapters, tmp_path / "r3")
    loaded = load_adapter(tmp_path / "r3")
    ours, theirs = lora_span(adapters, 3, CFG.d_model, rtol=RTOL), lora_span(loaded, 3, CFG.d_model, rtol=RTOL)
    np.testing.assert_allclose(_projector(theirs.basis), _projector(ours.basis), atol=1e-6)


def test_participation_ratio_and_its_resamples_equal_weighted_numpy():
    rng = np.random.default_rng(1)
    sizes = rng.integers(2, 9, 15)
    ids = np.repeat(np.arange(15) * 3 + 1, sizes)[rng.permutation(sizes.sum())]
    x = (rng.normal(size=(ids.size, 7)) * np.array([5, 3, 2, 1, 1, 0.5, 0.1]) + 4.0).astype(np.float32)
    grid = PromptGrid.from_sample_index(ids)
    iv = PromptCKA(grid, {"x": x}).participation_ratio("x", n_boot=50, seed=3)

    def pr(weights):
        mean = (weights[:, None] * x).sum(0) / weights.sum()
        cov = ((x - mean) * weights[:, None]).T @ (x - mean)
        lam = np.linalg.eigvalsh(cov)
        return lam.sum() ** 2 / np.sum(lam**2)

    np.testing.assert_allclose(iv.point, pr(np.ones(ids.size)), rtol=1e-5)
    counts = next(resample_counts(grid.n_prompts, 50, seed=3))  # prompts in grid order (sorted ids)
    token_weight = counts[:, np.searchsorted(grid.ids, ids)].astype(np.float64)  # [b, T]
    np.testing.assert_allclose(iv.samples, [pr(w) for w in token_weight], rtol=1e-4)
    assert iv.low <= iv.point <= iv.high


@pytest.mark.parametrize("s, dof", [(6, 40), (30, 9)])
def test_isotropic_spectrum_null_matches_direct_gaussian_draws(s, dof):
    """Bartlett's Wishart draws against G^T G of Gaussian G [dof, s]: the same participation-ratio law."""
    bartlett = NullCache(400, 0, near_orthogonal=70, aligned=30).isotropic_spectra(s, dof)  # [R, min]
    ratio = bartlett.sum(1) ** 2 / np.sum(bartlett**2, 1)
    rng = np.random.default_rng(5)
    direct = []
    for _ in range(400):
        lam = np.linalg.eigvalsh(np.cov(rng.normal(size=(dof + 1, s)), rowvar=False))  # dof = rows - 1 (centred)
        direct.append(lam.sum() ** 2 / np.sum(lam**2))
    se = np.hypot(ratio.std(), np.std(direct)) / np.sqrt(400)
    assert abs(ratio.mean() - np.mean(direct)) < 4 * se
    assert bartlett.shape == (400, min(s, dof))


# ------------------------------------------------------------------------------------ planted δ


def _tokens(rng, n_prompts=40):
    sizes = rng.integers(5, 15, n_prompts)
    return np.repeat(np.arange(n_prompts) * 7 + 3, sizes)


def _record(span, delta, ids, sae_rows):
    cka = PromptCKA(PromptGrid.from_sample_index(ids), {"delta": delta})
    nulls = NullCache(CONFIG.null_samples, 0, near_orthogonal=70, aligned=30)
    return span_record(span, delta, ids, cka, "delta", {0: sae_rows}, CONFIG, nulls)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    span = lora_span(_adapters(targets=("o",), rank=4), 1, CFG.d_model, rtol=RTOL)  # 8 of 29 dims
    ids = _tokens(rng)
    # inside: three strong directions of the span (plus weaker ones), the SAE's rows drawn from the span too
    coeff = rng.normal(size=(ids.size, span.dim)) * np.array([6, 4, 3, 0.3, 0.3, 0.2, 0.2, 0.1])
    inside = (coeff @ span.basis).astype(np.float32)
    sae_inside = (rng.normal(size=(16, span.dim)) @ span.basis).astype(np.float32)
    # independent: isotropic in the whole space, SAE rows likewise
    independent = rng.normal(size=(ids.size, CFG.d_model)).astype(np.float32)
    sae_random = rng.normal(size=(16, CFG.d_model)).astype(np.float32)
    return span, _record(span, inside, ids, sae_inside), _record(span, independent, ids, sae_random)


def test_delta_inside_the_span_is_all_in_it_at_angle_zero(planted):
    span, inside, _ = planted
    assert inside["span_dim"] == span.dim == 8 and inside["d_model"] == CFG.d_model and not inside["span_fills_space"]
    share = inside["delta_variance_in_span"]
    assert share["value"] > 1 - 1e-5 and share["ci_low"] > 1 - 1e-5 and share["vs_null"] == 1
    assert share["null"]["value"] == pytest.approx(8 / 29, abs=0.03)  # E = S / D for any δ
    for name in ("angles_sae_vs_span", "angles_pca_vs_span"):
        assert inside[name]["mean"]["value"] < 0.05 and inside[name]["mean"]["vs_null"] == -1, name
    assert inside["k"] == 5
    # three directions carry the variance: fewer than a signal filling the 8-dim span
    assert inside["effective_rank"]["value"] < 3.5 and inside["effective_rank"]["vs_null"] == -1
    assert inside["components_90"]["value"] <= 3 < inside["components_90"]["null"]["value"]


def test_delta_independent_of_the_span_gives_the_random_subspace_values(planted):
    _, _, independent = planted
    share = independent["delta_variance_in_span"]
    assert share["vs_null"] == 0 and share["ci_low"] <= 8 / 29 <= share["ci_high"]
    null = share["null"]
    assert null["ci_low"] <= share["value"] <= null["ci_high"]
    for name in ("angles_sae_vs_span", "angles_pca_vs_span"):
        m = independent[name]["mean"]
        assert m["vs_null"] == 0 and m["null"]["ci_low"] <= m["value"] <= m["null"]["ci_high"], name
    # isotropic in all 29 dims: more directions than a signal confined to 8, so the null can fail upward too
    assert independent["effective_rank"]["vs_null"] == 1


def test_a_span_that_fills_the_space_says_so():
    rng = np.random.default_rng(2)
    span = lora_span(_adapters(targets=("o", "down"), rank=8), 3, CFG.d_model, rtol=RTOL)
    assert span.dim == CFG.d_model
    ids = _tokens(rng, 12)
    rec = _record(span, rng.normal(size=(ids.size, CFG.d_model)).astype(np.float32), ids,
                  rng.normal(size=(16, CFG.d_model)).astype(np.float32))
    assert rec["span_fills_space"] and rec["delta_variance_in_span"]["value"] == 1.0
    assert rec["delta_variance_in_span"]["null"]["value"] == 1.0 and rec["delta_variance_in_span"]["vs_null"] == 0
    assert rec["angles_pca_vs_span"]["mean"]["value"] == 0.0 and rec["angles_pca_vs_span"]["mean"]["vs_null"] == 0


# ----------------------------------------------------------------------------- Table 9 one-to-one matching

D, N_DICT = 24, 40


def _sae(w_dec):
    f, d = w_dec.shape
    params = {"W_enc": np.ascontiguousarray(w_dec.T), "b_enc": np.full(f, -0.05, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d, np.float32)}
    return SAE(SAEConfig(d_in=d, d_sae=f), params)


def test_table9_matches_a_permuted_rescaled_copy_of_the_dictionary_one_to_one():
    rng = np.random.default_rng(4)
    dictionary = rng.normal(size=(N_DICT, D)).astype(np.float32)
    copy = (dictionary[rng.permutation(N_DICT)] * rng.uniform(0.2, 5.0, (N_DICT, 1))).astype(np.float32)
    ids = _tokens(rng, 20)
    h_base = rng.normal(size=(ids.size, D)).astype(np.float32)
    delta = np.maximum(rng.normal(size=(ids.size, N_DICT)) - 1, 0).astype(np.float32) @ copy
    saes = LayerSAEs(dictionary=_sae(dictionary), delta={"r4": {0: _sae(copy)}})
    firing = {firing_key("r4", 0): FiringCounts(np.full(N_DICT, 50, np.int64), n=1000)}
    nulls = NullCache(CONFIG.null_samples, 0, near_orthogonal=70, aligned=30)
    record, _ = analyze_layer(2, saes, h_base, ids, lambda name: delta, firing, CONFIG, nulls)
    t9 = record["adapters"]["r4"]["table9"]
    matched, mutual = t9["matched_cosine"], t9["mutual_nearest"]
    assert matched["value"] == pytest.approx(1.0, abs=1e-6) and matched["ci_low"] == pytest.approx(1.0, abs=1e-6)
    assert matched["vs_null"] == 1 and matched["vs_random"] == 1
    assert matched["null"]["ci_high"] < 0.5 and matched["random_init"]["ci_high"] < 0.5  # random: far below 1
    assert mutual["value"] == 1.0 and mutual["vs_null"] == 1
    assert mutual["null"]["value"] == pytest.approx(mutual["expected"], abs=0.1)  # n / (n + m - 1) = 1/2
    assert mutual["value"] == t9["delta_vs_dictionary"]["mnn"]["value"]  # the same statistic under its own name
    assert "lora_span" not in record["adapters"]["r4"]  # only with spans


def test_analyze_layer_adds_the_lora_span_record():
    rng = np.random.default_rng(6)
    adapters = init_adapters(Gemma2Config(vocab_size=11, d_model=D, n_heads=2, n_kv_heads=1, head_dim=4, mlp_dim=8,
                                          n_layers=3), [AdapterSpec(rank=2, alpha=4.0, targets=("o",), name="r2")],
                             random_b=True)
    span = lora_span(adapters, 2, D, rtol=RTOL)
    ids = _tokens(rng, 20)
    delta = (rng.normal(size=(ids.size, span.dim)) @ span.basis).astype(np.float32)
    rows = rng.normal(size=(N_DICT, D)).astype(np.float32)
    saes = LayerSAEs(dictionary=_sae(rng.normal(size=(N_DICT, D)).astype(np.float32)), delta={"r2": {0: _sae(rows)}})
    firing = {firing_key("r2", 0): FiringCounts(np.full(N_DICT, 50, np.int64), n=1000)}
    nulls = NullCache(CONFIG.null_samples, 0, near_orthogonal=70, aligned=30)
    record, _ = analyze_layer(2, saes, rng.normal(size=(ids.size, D)).astype(np.float32), ids, lambda name: delta,
                              firing, CONFIG, nulls, spans={"r2": span})
    cell = record["adapters"]["r2"]["lora_span"]
    assert cell["span_dim"] == 6 and cell["rank"] == 2 and cell["span_targets"] == ["o_proj"]
    assert cell["delta_variance_in_span"]["value"] > 1 - 1e-5 and cell["delta_variance_in_span"]["vs_null"] == 1
    assert jax.numpy.isfinite(cell["effective_rank"]["ci_low"])
