"""Corpus extraction and random access: values equal `residuals(...)`, metadata, selection, statistics."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lgeo_jax import AdapterSpec, Gemma2Config, LoraAdapters, abstract_model, residuals
from lgeo_jax.corpus import (
    Corpus,
    ExtractConfig,
    extract_corpus,
    open_corpus,
    summarize,
)
from lgeo_jax.data import TokenizedExample

LAYERS = (0, 2)
NAMES = ("r2", "r3")


class MemoryLog:
    """A stage stand-in: progress entries kept in memory, every update recorded."""

    def __init__(self):
        self.progress = {}
        self.updates = 0

    def update(self, **entries):
        self.progress = {**self.progress, **entries}
        self.updates += 1


def random_model(cfg, seed):
    """Every parameter random (norms too), filled from numpy: no per-op compiles as eager init has."""
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=jnp.float32))
    rng = np.random.default_rng(seed)
    flat = [(k, v.replace(value=jnp.asarray(rng.normal(0.0, 0.05, v.get_value().shape), jnp.float32)))
            for k, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def random_adapters(cfg, specs, seed, zero_b=False):
    """q/k/v/o LoRA factors for `specs` (rank-padded, PEFT scaling alpha / r), filled from numpy."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    dims = {"q": (cfg.d_model, q), "k": (cfg.d_model, kv), "v": (cfg.d_model, kv),
            "o": (q, cfg.d_model)}
    rank, n, layers = max(s.rank for s in specs), len(specs), cfg.n_layers
    rng = np.random.default_rng(seed)
    factors = {}
    for target, (d_in, d_out) in dims.items():
        a = rng.uniform(-1, 1, (layers, n, d_in, rank)) / np.sqrt(d_in)  # [L, n, In, R]
        b = np.zeros((layers, n, rank, d_out)) if zero_b else rng.normal(0, 0.02, (layers, n, rank, d_out))
        for i, spec in enumerate(specs):
            a[:, i, :, spec.rank:] = 0.0
            b[:, i, spec.rank:] = 0.0
        scale = np.broadcast_to([s.alpha / s.rank for s in specs], (layers, n))  # [L, n]
        factors[target] = tuple(jnp.asarray(x, jnp.float32) for x in (a, b, scale))
    return LoraAdapters(specs, factors)


def tiny():
    cfg = Gemma2Config(vocab_size=53, d_model=22, n_heads=2, n_kv_heads=1, head_dim=6, mlp_dim=38,
                       layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=5,
                       query_pre_attn_scalar=6.0)
    specs = [AdapterSpec(rank=2, alpha=4.0, name="r2"), AdapterSpec(rank=3, alpha=6.0, name="r3")]
    return random_model(cfg, seed=3), random_adapters(cfg, specs, seed=5)


def examples(n, seed, index0=100):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 14))
        ids = rng.integers(3, 53, size=length).astype(np.int32)
        ids[0] = 2  # BOS
        out.append(TokenizedExample(ids, np.ones(length, np.int32), index0 + i, False))
    return out


def reference(model, adapters, exs):
    """float64 base and deltas of each sequence, `[1 + A, C, T_i, D]`, from one right-padded batch."""
    width = max(e.length for e in exs)
    ids = np.zeros((len(exs), width), np.int32)
    mask = np.zeros((len(exs), width), np.int32)
    for row, e in enumerate(exs):
        ids[row, : e.length], mask[row, : e.length] = e.input_ids, 1
    res = np.asarray(residuals(model, ids, layers=LAYERS, adapters=adapters, attention_mask=mask), np.float64)
    out = np.concatenate([res[:1], res[1:] - res[:1]], axis=0)  # [A, C, B, T, D]
    return [out[:, :, row, : e.length] for row, e in enumerate(exs)]


@pytest.fixture(scope="module")
def built():
    model, adapters = tiny()
    splits = {"probe": examples(11, 0), "heldout": examples(5, 1, index0=500)}
    cats = {s: [(e.index * 7) % 5 for e in ex] for s, ex in splits.items()}
    refs = {s: reference(model, adapters, ex) for s, ex in splits.items()}
    return model, adapters, splits, cats, refs


def _extract(built, store, **kw):
    model, adapters, splits, cats, _ = built
    settings = ExtractConfig(layers=LAYERS, batch_size=3, chunk_rows=7, **kw)
    log = MemoryLog()
    layout, stats = extract_corpus(model, [adapters], NAMES, splits, cats, store, settings, log)
    return layout, stats, log


def _expected_row(refs, splits, split, sample, pos):
    i = [e.index for e in splits[split]].index(sample)
    return refs[split][i][:, :, pos]  # [A, C, D]


def _bf16(x):
    return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("store_dtype", ["bfloat16", "float32"])
def test_values_metadata_and_stats(built, store_dtype):
    _, _, splits, cats, refs = built
    layout, stats, log = _extract(built, f"memory://values-{store_dtype}/", store_dtype=store_dtype)
    corpus = open_corpus(f"memory://values-{store_dtype}/")
    assert corpus.layout == layout
    for split, exs in splits.items():
        meta = corpus.meta(split)
        # Every non-BOS token of every example exactly once, nothing else (no padding, no filler rows).
        got = sorted(zip(meta["sample_index"].tolist(), meta["position"].tolist(), strict=True))
        want = sorted((e.index, p) for e in exs for p in range(1, e.length))
        assert got == want
        by_index = {e.index: (e, c) for e, c in zip(exs, cats[split], strict=True)}
        for s, p, t, c in zip(meta["sample_index"], meta["position"], meta["token_id"], meta["category"], strict=True):
            assert t == by_index[s][0].input_ids[p] and c == by_index[s][1]
        n = corpus.n_rows(split)
        pairs = zip(meta["sample_index"], meta["position"], strict=True)
        expect = np.stack([_expected_row(refs, splits, split, s, p) for s, p in pairs], axis=2)  # [A, C, N, D]
        for a, name in enumerate(("base", *NAMES)):
            for c, layer in enumerate(LAYERS):
                stored = corpus.split_rows(split, name, layer, dtype=np.float64)  # [N, D]
                ref = expect[a, c]
                assert stored.shape == (n, 22)
                # float32 compute noise (batches pad differently) is ~1e-6 of the residual's scale;
                # bf16 adds at most half an ulp (2^-9 relative) of the float32 delta.
                noise = 1e-5 * np.abs(expect[0, c]).max()
                rel = 2.0**-8 if store_dtype == "bfloat16" else 0.0
                np.testing.assert_array_less(np.abs(stored - ref), rel * np.abs(ref) + noise)
                if store_dtype == "bfloat16" and a > 0:
                    # The delta is rounded once, after a float32 subtraction: several times closer to the
                    # exact delta than a difference of bf16-rounded residuals would be.
                    assert corpus.array(split, name, layer).dtype.numpy_dtype == ml_dtypes.bfloat16
                    naive = _bf16(expect[0, c] + ref) - _bf16(expect[0, c])
                    assert np.abs(stored - ref).mean() < 0.5 * np.abs(naive - ref).mean()
        # Statistics: mean norm and sum of squares from the float32 values, checked in float64.
        summary = summarize(stats, layout.names, layout.layers, layout.d_model)[split]
        for a, name in enumerate(("base", *NAMES)):
            for c, layer in enumerate(LAYERS):
                norms = np.linalg.norm(expect[a, c], axis=-1)
                entry = summary[name][f"L{layer}"]
                assert entry["count"] == n
                np.testing.assert_allclose(entry["mean_norm"], norms.mean(), rtol=1e-5)
                np.testing.assert_allclose(entry["rms_scale"], np.sqrt((norms**2).mean() / 22), rtol=1e-5)
    batches = sum(-(-len(e) // 3) for e in splits.values())
    assert log.updates == batches + 1  # one commit per batch, after the layout is recorded
    assert log.progress["corpus"]["committed"] == {"probe": 4, "heldout": 2}


def test_random_access_rows(built):
    _extract(built, "memory://rows/")
    corpus = open_corpus("memory://rows/")
    full = corpus.split_rows("probe", "r3", 2)
    idx = np.array([5, 0, 17, 5, corpus.n_rows("probe") - 1])
    np.testing.assert_array_equal(corpus.rows("probe", "r3", 2, idx), full[idx])
    with pytest.raises(ValueError, match="out of range"):
        corpus.rows("probe", "r3", 2, [corpus.n_rows("probe")])
    with pytest.raises(ValueError, match="layer 1 is not in this corpus"):
        corpus.rows("probe", "r3", 1, [0])
    with pytest.raises(ValueError, match="no corpus here"):
        Corpus("memory://nothing-here/")


def test_bos_kept_when_asked(built):
    _, _, splits, _, refs = built
    _extract(built, "memory://bos/", exclude_bos=False)
    corpus = open_corpus("memory://bos/")
    meta = corpus.meta("heldout")
    assert corpus.n_rows("heldout") == sum(e.length for e in splits["heldout"])
    rows = np.flatnonzero(meta["position"] == 0)
    assert len(rows) == len(splits["heldout"])
    base = corpus.rows("heldout", "base", 0, rows, dtype=np.float64)
    ref = np.stack([_expected_row(refs, splits, "heldout", meta["sample_index"][r], 0)[0, 0] for r in rows])
    np.testing.assert_allclose(base, ref, rtol=2.0**-8, atol=1e-5 * np.abs(ref).max())


def test_subsample_one_selection_for_all_arrays(built):
    _, _, splits, _, refs = built
    sel = {"token_budget": 20, "subsample_seed": 7}
    _extract(built, "memory://sub-a/", **sel, store_dtype="float32")
    _extract(built, "memory://sub-b/", **sel, store_dtype="float32")
    _extract(built, "memory://sub-c/", token_budget=20, subsample_seed=8, store_dtype="float32")
    a, b, c = (open_corpus(f"memory://sub-{k}/") for k in "abc")
    assert a.n_rows("probe") == 20
    assert a.n_rows("heldout") == min(20, sum(e.length - 1 for e in splits["heldout"]))
    meta_a, meta_c = a.meta("probe"), c.meta("probe")
    for field in meta_a:
        np.testing.assert_array_equal(meta_a[field], b.meta("probe")[field])  # deterministic
    pairs_a = set(zip(meta_a["sample_index"].tolist(), meta_a["position"].tolist(), strict=True))
    assert pairs_a != set(zip(meta_c["sample_index"].tolist(), meta_c["position"].tolist(), strict=True))
    assert all(p >= 1 for _, p in pairs_a) and len(pairs_a) == 20
    # Row r of every array is the token the metadata names: the selection is shared.
    for ai, name in enumerate(("base", *NAMES)):
        for ci, layer in enumerate(LAYERS):
            got = a.split_rows("probe", name, layer, dtype=np.float64)
            ref = np.stack([_expected_row(refs, splits, "probe", s, p)[ai, ci]
                            for s, p in zip(meta_a["sample_index"], meta_a["position"], strict=True)])
            np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max() + 1e-6, rtol=0)


def test_zero_delta_chunks_are_stored_not_missing(built):
    model, _, splits, cats, _ = built
    cfg = model.config
    zero = random_adapters(cfg, [AdapterSpec(rank=2, alpha=4.0, name="z")], seed=1, zero_b=True)  # delta == 0
    settings = ExtractConfig(layers=LAYERS, batch_size=3, chunk_rows=5)
    extract_corpus(model, [zero], ["z"], {"probe": splits["probe"]}, {"probe": cats["probe"]},
                   "memory://zero/", settings, MemoryLog())
    corpus = open_corpus("memory://zero/")
    delta = corpus.split_rows("probe", "z", 2)
    assert delta.shape[0] == corpus.n_rows("probe") and not delta.any()
    assert np.abs(corpus.split_rows("probe", "base", 2)).min(axis=1).max() > 0
