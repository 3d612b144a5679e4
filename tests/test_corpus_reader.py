"""Shuffled SAE batches from the corpus store; bad stores: corrupt, truncated or missing chunks,
wrong dtype/shape on resume, a store from another config."""

import collections
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
from test_corpus import NAMES, MemoryLog, examples, tiny

from lgeo_jax.corpus import CorpusLayout, CorpusSource, ExtractConfig, extract_corpus, open_corpus
from lgeo_jax.corpus._store import claim_store, open_array, open_corpus_arrays, store_url
from lgeo_jax.sae import ArraySource

D = 12


def synthetic_corpus(url, n_rows, chunk_rows, seed=0):
    """A corpus written through the store API with random values (no model needed); returns the arrays."""
    url = store_url(url)
    layout = CorpusLayout(d_model=D, layers=(3, 7), adapters=("r4",), split_rows={"probe": n_rows, "heldout": 50},
                          store_dtype="bfloat16", chunk_rows=chunk_rows, categories=("a",), identity=f"synthetic{seed}")
    claim_store(url, layout)
    arrays = open_corpus_arrays(url, layout, create=True)
    rng = np.random.default_rng(seed)
    values = {}
    for (split, name, layer), arr in arrays.items():
        if name == "meta":
            arr.write(np.zeros(arr.shape, np.int32)).result()
            continue
        v = rng.normal(size=arr.shape).astype(ml_dtypes.bfloat16)
        arr.write(v).result()
        values[(split, name, layer)] = v.astype(np.float32)
    return values


def test_epoch_larger_than_buffer_each_row_once_shuffled():
    n = 2048
    values = synthetic_corpus("memory://shuffle/", n, chunk_rows=64)
    corpus = open_corpus("memory://shuffle/")
    keys = [("r4", 3), ("base", 7)]
    with CorpusSource(corpus, "probe", keys, seed=1, buffer_rows=256, prefetch=1) as source:
        assert source.names == ("r4/L3", "base/L7") and source.n_rows == n and source.d_in == D
        seen = []
        for step in range(n // 32):
            batch = source.batch(step, 32)
            assert batch.x.shape == (2, 32, D) and batch.x.dtype == np.float32
            for s, key in enumerate(keys):
                np.testing.assert_array_equal(batch.x[s], values[("probe", *key)][batch.rows[s]])
            seen.extend(batch.rows[0].tolist())
        # The reader never held more than (windows a batch touches + prefetch) windows: far below the corpus.
        assert source.peak_resident_rows <= 3 * 256 < n
        # The next epoch starts over in a different order; batches are pure functions of the step.
        again = source.batch(n // 32, 32)
        first = source.batch(0, 32)
        np.testing.assert_array_equal(source.batch(0, 32).x, first.x)
    assert sorted(seen) == list(range(n))  # every row exactly once per epoch
    assert seen != sorted(seen)
    windows = np.asarray(seen).reshape(-1, 256)  # in-buffer shuffle mixes rows across a window's chunks
    assert all(len(set((w // 64).tolist())) == 4 for w in windows)
    assert not np.array_equal(again.rows[0], first.rows[0])


def test_an_array_several_saes_read_is_read_once(tmp_path):
    """The base stream that every adapter's crosscoder reads: each SAE gets its rows, from one read per window."""
    values = synthetic_corpus("memory://shared/", 512, chunk_rows=64)
    corpus = open_corpus("memory://shared/")
    keys = [("base", 3), ("r4", 3), ("base", 3)]
    with CorpusSource(corpus, "probe", keys, held_out_split="heldout", seed=2, buffer_rows=128) as source:
        reads, array = collections.Counter(), corpus.array
        corpus.array = lambda split, name, layer: reads.update([(name, layer)]) or array(split, name, layer)
        for step in range(8):
            batch = source.batch(step, 32)
            for s, key in enumerate(keys):
                np.testing.assert_array_equal(batch.x[s], values[("probe", *key)][batch.rows[s]])
        assert reads[("base", 3)] == reads[("r4", 3)] > 0
        held = source.held_out(20)
        np.testing.assert_array_equal(held[0], held[2])
        assert not np.array_equal(held[0], held[1])


def test_shards_partition_each_global_batch():
    n = 1024
    synthetic_corpus("memory://shards/", n, chunk_rows=32)
    corpus = open_corpus("memory://shards/")
    sources = [CorpusSource(corpus, "probe", [("r4", 3)], seed=4, buffer_rows=128, shard_index=h, shard_count=2)
               for h in range(2)]
    rows = []
    for step in range(n // 64):
        parts = [s.batch(step, 64).rows[0] for s in sources]
        assert all(p.shape == (32,) for p in parts)
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        rows.extend(np.concatenate(parts).tolist())
    assert sorted(rows) == list(range(n))
    for s in sources:
        s.close()


def test_uneven_shards_same_steps_every_epoch_no_repeats():
    n = 1000  # 32 chunks of 32 rows, the last one short (8 rows), dealt to 3 shards
    synthetic_corpus("memory://uneven/", n, chunk_rows=32)
    corpus = open_corpus("memory://uneven/")
    sources = [CorpusSource(corpus, "probe", [("r4", 3)], seed=2, buffer_rows=96, shard_index=h, shard_count=3)
               for h in range(3)]
    steps = (32 // 3 * 32 - 24) // 16  # fewest rows a shard can get, in local batches of 16
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            parts = [s.batch(step, 48).rows[0] for s in sources]
            assert all(p.shape == (16,) for p in parts)
            seen.extend(np.concatenate(parts).tolist())
        assert len(seen) == len(set(seen)) == steps * 48  # nobody served a row twice in an epoch
    for s in sources:
        s.close()


def test_source_trains_like_array_source_interface():
    values = synthetic_corpus("memory://iface/", 300, chunk_rows=16)
    corpus = open_corpus("memory://iface/")
    source = CorpusSource(corpus, "probe", [("r4", 7)], held_out_split="heldout", seed=0, buffer_rows=64)
    ref = ArraySource([values[("probe", "r4", 7)]])
    assert (source.n_rows, source.d_in) == (ref.n_rows, ref.d_in)
    held = source.held_out(20)
    assert held.shape == (1, 20, D)
    heldout = values[("heldout", "r4", 7)]
    assert all(any(np.array_equal(h, r) for r in heldout) for h in held[0])
    with pytest.raises(ValueError, match="exceeds"):
        source.batch(0, 400)
    with pytest.raises(ValueError, match="cannot hold one chunk"):
        CorpusSource(corpus, "probe", [("r4", 7)], buffer_rows=8)
    source.close()


def _chunk_files(root):
    return sorted(p for p in pathlib.Path(root, "probe", "r4", "L3", "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_chunk_is_an_error_not_zeros(tmp_path, damage):
    synthetic_corpus(str(tmp_path / "c"), 256, chunk_rows=32)
    target = _chunk_files(tmp_path / "c")[2]  # rows 64..95
    data = bytearray(target.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    else:
        target.unlink()
    corpus = open_corpus(tmp_path / "c")
    corpus.rows("probe", "r4", 3, np.arange(0, 64))  # undamaged chunks still read
    with pytest.raises(ValueError, match="DATA_LOSS|Digest|Not enough data|FAILED_PRECONDITION|NOT_FOUND|missing"):
        corpus.rows("probe", "r4", 3, [70])
    with pytest.raises(ValueError):
        corpus.split_rows("probe", "r4", 3)
    source = CorpusSource(corpus, "probe", [("r4", 3)], buffer_rows=256)
    with pytest.raises(ValueError):
        source.batch(0, 16)
    source.close()


def _snapshot(root):
    return {p: p.read_bytes() for p in pathlib.Path(root).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small():
    model, adapters = tiny()
    exs = {"probe": examples(7, 3)}
    return model, adapters, exs, {"probe": [0] * 7}


def test_store_from_another_config_is_refused_untouched(tmp_path, small):
    model, adapters, exs, cats = small
    store = str(tmp_path / "store")
    extract_corpus(model, [adapters], NAMES, exs, cats, store, ExtractConfig(layers=(0, 2), batch_size=2,
                   chunk_rows=8), MemoryLog())
    before = _snapshot(store)
    for settings in (ExtractConfig(layers=(1,), batch_size=2, chunk_rows=8),
                     ExtractConfig(layers=(0, 2), batch_size=3, chunk_rows=8),
                     ExtractConfig(layers=(0, 2), batch_size=2, chunk_rows=8, store_dtype="float32")):
        with pytest.raises(ValueError, match="another config or inputs"):
            extract_corpus(model, [adapters], NAMES, exs, cats, store, settings, MemoryLog())
    with pytest.raises(ValueError, match="another config or inputs"):  # same settings, other weights
        extract_corpus(model, [adapters], NAMES, exs, cats, store, ExtractConfig(layers=(0, 2), batch_size=2,
                       chunk_rows=8), MemoryLog(), inputs_hash="other-checkpoint")
    assert _snapshot(store) == before


def test_wrong_dtype_or_shape_on_resume_is_refused_untouched(tmp_path, small):
    model, adapters, exs, cats = small
    store = str(tmp_path / "store")
    settings = ExtractConfig(layers=(0, 2), batch_size=2, chunk_rows=8)
    log = MemoryLog()
    layout, _ = extract_corpus(model, [adapters], NAMES, exs, cats, store, settings, log)
    # Replace one array by one of another dtype (as a foreign writer would), then resume.
    url = store_url(store)
    bad = tmp_path / "store" / "probe" / "r3" / "L2"
    for p in sorted(bad.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    open_array(url, "probe/r3/L2/", shape=(layout.split_rows["probe"], 22), dtype="float32", chunk=(8, 22),
               create=True)
    before = _snapshot(store)
    log.progress["corpus"]["committed"]["probe"] = 1  # an interrupted run
    with pytest.raises(ValueError, match="dtype float32, expected .* bfloat16"):
        extract_corpus(model, [adapters], NAMES, exs, cats, store, settings, log)
    assert _snapshot(store) == before
    # A manifest recording another corpus is refused too.
    with pytest.raises(ValueError, match="other settings, data or checkpoints"):
        extract_corpus(model, [adapters], NAMES, exs, cats, store,
                       ExtractConfig(layers=(0, 2), batch_size=3, chunk_rows=8), log)
    assert _snapshot(store) == before
    assert os.path.exists(tmp_path / "store" / "corpus.json")


def test_sae_trainer_runs_on_corpus_source(tmp_path):
    from lgeo_jax.sae import SAEConfig, SAETrainConfig, train_saes

    synthetic_corpus("memory://trainer/", 512, chunk_rows=32)
    corpus = open_corpus("memory://trainer/")
    with CorpusSource(corpus, "probe", [("r4", 3), ("base", 7)], held_out_split="heldout", buffer_rows=128) as source:
        result = train_saes(source, SAEConfig(d_in=D, d_sae=16),
                            SAETrainConfig(batch_size=32, steps=6, scale_batches=2, eval_rows=16, log_every=2,
                                        eval_every=3, checkpoint_every=100),
                            l1_coeffs=[0.1, 0.1], seeds=[0, 1], out_dir=tmp_path / "saes", progress=False, plot=False)
    assert len(result.saes) == 2 and len(result.final_metrics) == 2
    values = [v for m in result.final_metrics for v in m.values() if isinstance(v, float)]
    assert values and np.all(np.isfinite(values))
