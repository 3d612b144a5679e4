"""Planted truth: layers whose answer is known by construction, through `analyze_layer` (what the stage runs).

* delta in the dictionary's span: the delta SAEs' decoder rows are (noisy) dictionary atoms, so Table 9's
  max-cosine and mutual-nearest fraction must be above the random-init null (verdict +1, intervals apart)
  and Table 10's angles below it (-1: more aligned than chance).
* delta independent of the dictionary: rows in a random subspace, which a random-init SAE matches in
  distribution, so every Table 9-10 verdict must be 0.
* delta unrelated to h_base: CKA(h_base, h_adapted) must be indistinguishable from its null (h_base + delta of
  random other tokens), however close to 1 it is; with delta built from h_base it must be above it.
"""

import numpy as np
import pytest

from lgeo_jax.analysis import AnalysisConfig, FiringCounts, LayerSAEs, NullCache, analyze_layer, firing_key
from lgeo_jax.sae import SAE, SAEConfig

D, N_DICT, WIDTH, K = 32, 96, 48, 6
CONFIG = AnalysisConfig(subspace_k=K, k_sweep=(3, K), n_boot=200, subspace_boot=40, null_samples=20)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sae(w_dec, b_enc=-0.05):
    """A ReLU SAE whose encoder is its decoder's transpose (it fires where its directions are present)."""
    f, d = w_dec.shape
    params = {"W_enc": np.ascontiguousarray(w_dec.T), "b_enc": np.full(f, b_enc, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d, np.float32)}
    return SAE(SAEConfig(d_in=d, d_sae=f), params)


def _dictionary(rng):
    """An anisotropic reference dictionary: rows concentrated near a K-dim subspace U, so its top-K subspace is
    well defined (an isotropic dictionary has none for a delta SAE to align with)."""
    basis = np.linalg.qr(rng.normal(size=(D, K)))[0].T  # [K, D]
    return _unit(rng.normal(size=(N_DICT, K)) @ basis + 0.25 * rng.normal(size=(N_DICT, D)))


def _tokens(rng, n_prompts=60):
    sizes = rng.integers(4, 12, n_prompts)
    ids = np.repeat(np.arange(n_prompts) * 5 + 2, sizes)
    h_base = (rng.normal(size=(n_prompts, D))[np.arange(n_prompts).repeat(sizes)]
              + rng.normal(size=(ids.size, D)) + 3.0).astype(np.float32)
    return ids, h_base


def _analyze(delta_rows_by_seed, delta, h_base, ids, dictionary):
    saes = LayerSAEs(dictionary=_sae(dictionary), delta={"r4": {s: _sae(w) for s, w in delta_rows_by_seed.items()}})
    firing = {firing_key("r4", s): FiringCounts(np.ones(WIDTH, np.int64) * 50, n=1000) for s in delta_rows_by_seed}
    nulls = NullCache(CONFIG.null_samples, 0, near_orthogonal=70, aligned=30)
    record, _ = analyze_layer(3, saes, h_base, ids, lambda name: delta, firing, CONFIG, nulls)
    return record["adapters"]["r4"]


def _apart(m, null):
    """The estimate's interval and the null's do not overlap."""
    return m["ci_low"] > null["ci_high"] or m["ci_high"] < null["ci_low"]


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    dictionary = _dictionary(rng)
    ids, h_base = _tokens(rng)
    atoms = {s: _unit(dictionary[rng.choice(N_DICT, WIDTH, replace=False)] + 0.1 * rng.normal(size=(WIDTH, D)))
             for s in (0, 1)}  # what SAEs trained on delta = sparse sums of dictionary atoms would learn
    delta = (np.maximum(rng.normal(size=(ids.size, WIDTH)) - 1.0, 0) @ atoms[0]).astype(np.float32)
    in_span = _analyze(atoms, delta, h_base, ids, dictionary)
    subspace = np.linalg.qr(rng.normal(size=(D, 8)))[0].T  # a random 8-dim subspace, unrelated to the dictionary
    rows = {s: _unit(rng.normal(size=(WIDTH, 8)) @ subspace) for s in (0, 1)}
    independent = _analyze(rows, (rng.normal(size=(ids.size, 8)) @ subspace).astype(np.float32), h_base, ids,
                           dictionary)
    return in_span, independent


def test_delta_in_the_dictionary_span_separates_from_the_null(planted):
    cell, _ = planted
    t9, t10 = cell["table9"], cell["table10"]
    for stat in ("mean", "median", "mnn"):
        assert t9["delta_vs_dictionary"][stat]["vs_null"] == 1, stat
        assert _apart(t9["delta_vs_dictionary"][stat], t9["random_init"][stat]), stat
    assert t9["delta_vs_dictionary"]["mean"]["vs_random"] == 1
    assert t10["delta_vs_dictionary"]["mean"]["vs_null"] == -1  # smaller angles: more aligned than chance
    assert _apart(t10["delta_vs_dictionary"]["mean"], t10["random_init"]["mean"])
    assert t10["delta_vs_dictionary"]["pct_aligned"]["vs_null"] == 1
    assert cell["table10_k"]["cells"][str(K)]["delta_vs_dictionary"]["mean"]["vs_null"] == -1


def test_delta_independent_of_the_dictionary_is_indistinguishable(planted):
    _, cell = planted
    for stat in ("mean", "median", "mnn"):
        assert cell["table9"]["delta_vs_dictionary"][stat]["vs_null"] == 0, stat
    for stat in ("mean", "pct_near_orthogonal"):
        assert cell["table10"]["delta_vs_dictionary"][stat]["vs_null"] == 0, stat


def test_cka_base_adapted_null_fails_only_when_it_should():
    """δ independent of h_base: CKA(h_base, h_adapted) ~ 0.9 yet indistinguishable from its null; δ a linear
    function of h_base: above it. (The old within-batch null, about 0.005, would have called both a finding.)"""
    rng = np.random.default_rng(1)
    dictionary = _dictionary(rng)
    ids, h_base = _tokens(rng)
    rows = {0: _unit(rng.normal(size=(WIDTH, D)))}
    unrelated = (0.4 * rng.normal(size=h_base.shape)).astype(np.float32)
    cell = _analyze(rows, unrelated, h_base, ids, dictionary)["table11"]
    assert cell["base_adapted"]["value"] > 0.5 and cell["base_adapted"]["vs_null"] == 0
    assert cell["delta_base"]["vs_null"] == 0
    centred = h_base - h_base.mean(0)
    related = (centred @ rng.normal(size=(D, D)) * 0.15 + 0.1 * rng.normal(size=h_base.shape)).astype(np.float32)
    cell = _analyze(rows, related, h_base, ids, dictionary)["table11"]
    assert cell["base_adapted"]["vs_null"] == 1 and cell["delta_base"]["vs_null"] == 1
