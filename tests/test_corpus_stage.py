"""The `corpus` stage end to end on a tiny run directory, including a real SIGKILL mid-extraction."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_corpus import random_adapters, random_model

from lgeo_jax import save_adapter, save_model
from lgeo_jax.analysis import AnalysisConfig
from lgeo_jax.corpus import BASE_NAME, STATS_FILE, ExtractConfig, load_stats, open_corpus
from lgeo_jax.data import Category, DataConfig, categorize
from lgeo_jax.lora import LoraConfig
from lgeo_jax.model import BuiltinModelConfig, ModelConfig
from lgeo_jax.stages import (
    PIPELINE,
    StageState,
    adapter_dirs,
    base_checkpoint,
    corpus_size_bytes,
    corpus_store,
    load_records,
    load_tokenizer,
    open_run,
    run_stages,
)
from lgeo_jax.study import StudyConfig, dump_config

CHILD = """
import sys, time
from lgeo_jax.stages import StageRun, run_stages
from lgeo_jax.study import load_config

# Slow every manifest commit so the parent's kill lands mid-run (the parent kills on manifest progress).
_update = StageRun.update
def slow_update(self, **entries):
    _update(self, **entries)
    time.sleep(0.4)
StageRun.update = slow_update

run_stages(load_config(sys.argv[1]), "corpus", echo=lambda line: None)
"""


def study(root) -> StudyConfig:
    return StudyConfig(
        run_dir=str(root),
        model=ModelConfig(checkpoint="builtin:tiny", builtin=BuiltinModelConfig(
            d_model=24, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=40, sliding_window=16)),
        data=DataConfig(source="builtin:synthetic", n_records=40, train=(0, 20), probe=(20, 32), heldout=(32, 40)),
        lora=LoraConfig(ranks=(2, 4)),
        extract=ExtractConfig(layers=(0, 2), batch_size=2, chunk_rows=16),
        analysis=AnalysisConfig(subspace_k=8),
    )


def _random_base(config, stage, run):
    cfg = config.model.builtin.with_vocab(len(load_tokenizer(run, config)))
    save_model(random_model(cfg, seed=1), base_checkpoint(run, config))


def _random_adapters(config, stage, run):
    cfg = config.model.builtin.with_vocab(len(load_tokenizer(run, config)))
    adapters = random_adapters(cfg, config.lora.adapter_specs(), seed=2)
    for i, directory in enumerate(adapter_dirs(run, config)):
        save_adapter(adapters, directory, index=i)


# The study's pipeline with random weights for the base and the adapters (B random, so deltas are non-zero).
_RANDOM = {"base": _random_base, "adapters": _random_adapters}
RANDOM_WEIGHTS = tuple(dataclasses.replace(s, run=_RANDOM.get(s.name, s.run)) for s in PIPELINE)


def prepare(root) -> StudyConfig:
    """Data, base and adapters stages complete, through the one pipeline loop."""
    config = study(root)
    run_stages(config, "adapters", pipeline=RANDOM_WEIGHTS, echo=lambda line: None)
    return config


def store_arrays(config):
    corpus = open_corpus(corpus_store(config, open_run(config)))
    out = {}
    for split in corpus.splits:
        out[(split, "meta")] = corpus.meta(split)
        for name in corpus.layout.names:
            for layer in corpus.layout.layers:
                out[(split, name, layer)] = np.asarray(corpus.array(split, name, layer).read().result())
    return corpus, out


def committed(root) -> int:
    try:
        manifest = json.loads(pathlib.Path(root, "corpus", "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(manifest["progress"].get("corpus", {}).get("committed", {}).values())


def test_kill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    # Uninterrupted reference run, in this process.
    ref_cfg = prepare(tmp_path / "ref")
    ref_run = open_run(ref_cfg)
    run_stages(ref_cfg, "corpus", echo=lambda line: None)
    corpus, ref = store_arrays(ref_cfg)
    total = sum(-(-(b - a) // 2) for a, b in (ref_cfg.data.probe, ref_cfg.data.heldout))

    # Killed run: a real child process, SIGKILLed once the manifest shows committed batches.
    cfg = prepare(tmp_path / "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(dump_config(cfg))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while committed(cfg.run_dir) < 2:
        if child.poll() is not None:
            pytest.fail(f"child ended before it could be killed:\n{child.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("no extraction progress within 120 s")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = committed(cfg.run_dir)
    assert 2 <= done < total

    run = open_run(cfg)
    assert run.check("corpus").state is StageState.RESUMABLE
    # A checkpoint changed under the interrupted stage makes it stale (it would restart with the new weights)...
    weights = adapter_dirs(run, cfg)[1] / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + bytes(4))
    check = open_run(cfg).check("corpus")
    assert check.state is StageState.STALE and check.reasons[0].startswith("adapter r4 (")
    assert committed(cfg.run_dir) == done
    # ...and with the checkpoint restored the run resumes where it stopped.
    weights.write_bytes(original)
    assert open_run(cfg).check("corpus").state is StageState.RESUMABLE
    outcomes = run_stages(cfg, "corpus", echo=lambda line: None)
    assert [o.name for o in outcomes if o.ran] == ["corpus"]

    _, got = store_arrays(cfg)
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        if key[1] == "meta":
            for field in value:
                np.testing.assert_array_equal(got[key][field], value[field])
        else:
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key].view(np.uint16), value.view(np.uint16))  # bit-identical
    # No row lost or duplicated: (sample, position) pairs are unique and cover every kept token.
    records = load_records(ref_run)
    tokenizer = load_tokenizer(ref_run, ref_cfg)
    from lgeo_jax.data import tokenize_split

    for split in corpus.splits:
        meta = got[(split, "meta")]
        pairs = list(zip(meta["sample_index"].tolist(), meta["position"].tolist(), strict=True))
        assert len(pairs) == len(set(pairs))
        exs = tokenize_split(records, tokenizer, ref_cfg.data, split)
        assert sorted(pairs) == sorted((e.index, p) for e in exs for p in range(1, e.length))
        ids = {e.index: e.input_ids for e in exs}
        assert all(t == ids[s][p] for s, p, t in zip(meta["sample_index"], meta["position"], meta["token_id"],
                                                      strict=True))
        names = [c.value for c in Category]
        assert all(names[c] == categorize(records[s].instruction).value
                   for s, c in zip(meta["sample_index"], meta["category"], strict=True))
    # Statistics saved by the resumed run equal the uninterrupted run's, to the bit.
    assert load_stats(tmp_path / "killed" / "corpus")["splits"] == load_stats(tmp_path / "ref" / "corpus")["splits"]
    stats = load_stats(tmp_path / "ref" / "corpus")
    base = ref[("probe", BASE_NAME, 2)].astype(np.float64)
    np.testing.assert_allclose(stats["splits"]["probe"][BASE_NAME]["L2"]["mean_norm"],
                               np.linalg.norm(base, axis=1).mean(), rtol=1e-2)  # stored bf16 vs float32 sums
    assert stats["rows"] == {s: corpus.n_rows(s) for s in corpus.splits}
    assert (pathlib.Path(ref_cfg.run_dir) / "corpus" / STATS_FILE).is_file()


def test_corpus_size_bytes_paper_scale():
    config = StudyConfig(model=ModelConfig(checkpoint="/models/gemma-2-9b", n_layers=42, d_model=3584))
    arrays = 6 * 5  # six layers x (base + four adapters)
    per_array = 1_000_000 * 3584 * 2
    assert per_array == 7_168_000_000  # the paper's ~7.2 GB per (adapter, layer)
    assert corpus_size_bytes(config, 1_000_000, 3584) == arrays * per_array + 1_000_000 * 16
    f32 = dataclasses.replace(config, extract=dataclasses.replace(config.extract, store_dtype="float32"))
    assert corpus_size_bytes(f32, 10, 4) == arrays * 10 * 4 * 4 + 10 * 16
