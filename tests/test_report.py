"""The analysis and report stages end to end on a tiny hand-built run, and their errors on bad inputs.

The upstream stage outputs (corpus store + stats, delta / base SAEs, L1 sweep, a Gemma Scope-format
directory of random JumpReLU SAEs) are written directly here with the corpus / SAE packages' own
writers, so these tests do not depend on training anything.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from lgeo_jax.analysis import ERROR_NAMES
from lgeo_jax.corpus import BASE_NAME, CATEGORY_NAMES, META_FIELDS, CorpusLayout, SplitStats, store_url, summarize
from lgeo_jax.corpus._store import claim_store, open_corpus_arrays
from lgeo_jax.report import FIGURES_CSV, FIGURES_JSON, REPORT_FILE
from lgeo_jax.sae import SAE, SAEConfig, init_params, load_sae, save_sae
from lgeo_jax.stages import (
    PIPELINE,
    Run,
    StageState,
    base_sae_dir,
    corpus_store,
    delta_sae_dir,
    open_run,
    results_path,
    run_stages,
    sweep_path,
)
from lgeo_jax.study import load_config

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
D, WIDTH, GS_WIDTH = 64, 256, 192  # tiny.yaml: d_model 64, expansion 4; the "Gemma Scope" width differs on purpose
LAYERS, RANKS, SEEDS = (1, 3), (4, 8), (0, 1)
GS_L0 = {1: 11, 3: 13}
ROWS = {"probe": 96, "heldout": 1100}  # > 1024 held-out rows: two evaluation batches, the second partial


def make_config(root: pathlib.Path, gs_dir: pathlib.Path, *extra: str):
    return load_config(CONFIG, [
        f"run_dir={root / 'run'}", f"lora.ranks={list(RANKS)}", f"extract.layers={list(LAYERS)}",
        f"sae.seeds={list(SEEDS)}", f"analysis.gemma_scope_dir={gs_dir}",
        f"analysis.gemma_scope_l0={json.dumps({str(k): v for k, v in GS_L0.items()})}",
        "analysis.null_samples=2", *extra])


def _overrides(config) -> list[str]:
    """The overrides `make_config` applied (run_dir aside), to rebuild the same config elsewhere."""
    return [f"lora.ranks={list(RANKS)}", f"extract.layers={list(LAYERS)}", f"sae.seeds={list(SEEDS)}",
            f"analysis.gemma_scope_dir={config.analysis.gemma_scope_dir}",
            f"analysis.gemma_scope_l0={json.dumps({str(k): v for k, v in GS_L0.items()})}", "analysis.null_samples=2"]


def random_relu_sae(seed: int, scale: float, width: int = WIDTH) -> SAE:
    cfg = SAEConfig(d_in=D, d_sae=width)
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(seed), cfg).items()}
    rng = np.random.default_rng(seed)
    params["b_enc"] = (-0.3 + 0.05 * rng.normal(size=width)).astype(np.float32)  # sparse-ish, never all dead
    params["b_dec"] = (0.1 * rng.normal(size=D)).astype(np.float32)
    return SAE(cfg, params, scale)


def write_gemma_scope_dir(gs_dir: pathlib.Path, layers=LAYERS, d: int = D) -> None:
    """Random JumpReLU SAEs in the Gemma Scope hub layout: layer_L/width_16k/average_l0_N/params.npz."""
    for layer in layers:
        rng = np.random.default_rng(100 + layer)
        w_dec = rng.normal(size=(GS_WIDTH, d)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        out = gs_dir / f"layer_{layer}" / "width_16k" / f"average_l0_{GS_L0[layer]}"
        out.mkdir(parents=True)
        np.savez(out / "params.npz", W_enc=(w_dec.T / 3).astype(np.float32), W_dec=w_dec * 3,
                 b_enc=np.zeros(GS_WIDTH, np.float32), b_dec=(0.5 * rng.normal(size=d)).astype(np.float32),
                 threshold=np.full(GS_WIDTH, 0.8, np.float32))


def activations(rows: int, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """h_base with a large common offset and deltas that live mostly in a rank-dependent subspace."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in LAYERS:
        base = (rng.normal(size=(rows, D)) * (1 + layer) + 5.0).astype(np.float32)
        out[(BASE_NAME, layer)] = base
        for rank in RANKS:
            basis = rng.normal(size=(rank, D))
            coef = rng.normal(size=(rows, rank)) + 0.3 * base[:, :rank]  # partly a function of h_base
            out[(f"r{rank}", layer)] = (coef @ basis * 0.2 + 0.01 * rng.normal(size=(rows, D))).astype(np.float32)
    return out


def write_corpus(config, run: Run, stage_path: pathlib.Path, rows=ROWS) -> None:
    names = [f"r{r}" for r in RANKS]
    layout = CorpusLayout(d_model=D, layers=LAYERS, adapters=tuple(names), split_rows=dict(rows),
                          store_dtype="float32", chunk_rows=64, categories=CATEGORY_NAMES, identity="test")
    url = store_url(corpus_store(config, run))
    claim_store(url, layout)
    arrays = open_corpus_arrays(url, layout, create=True)
    stats = {}
    for i, (split, n) in enumerate(rows.items()):
        acts = activations(n, seed=i)
        s = SplitStats.zeros(len(layout.names), len(LAYERS))
        norm_sum, sq_sum = np.zeros((len(layout.names), len(LAYERS))), np.zeros((len(layout.names), len(LAYERS)))
        for a, name in enumerate(layout.names):
            for c, layer in enumerate(LAYERS):
                x = acts[(name, layer)]
                if n:
                    arrays[(split, name, layer)][:].write(x).result()
                norm_sum[a, c] = np.linalg.norm(x.astype(np.float64), axis=1).sum()
                sq_sum[a, c] = np.sum(x.astype(np.float64) ** 2)
        for field in META_FIELDS:
            if n:
                arrays[(split, "meta", field)][:].write(np.zeros(n, np.int32)).result()
        s.add(n, norm_sum, sq_sum)
        stats[split] = s
    (stage_path / "stats.json").write_text(json.dumps({
        "store": url, "activation_dtype": "float32", "store_dtype": "float32", "rows": dict(rows),
        "splits": summarize(stats, layout.names, LAYERS, D)}))


def write_saes(config, run: Run) -> None:
    for layer in LAYERS:
        for seed in SEEDS:
            for rank in RANKS:
                save_sae(delta_sae_dir(run, rank, layer, seed), random_relu_sae(1000 * rank + 10 * layer + seed, 0.5))
            save_sae(base_sae_dir(run, layer, seed), random_relu_sae(7 + 10 * layer + seed, 3.0))
    sweep_path(run).write_text(json.dumps({"adapter": "r4", "layer": LAYERS[0], "selected_l1": 0.1,
                                           "normalize": config.sae.normalize.value, "points": [
        {"l1_coeff": c, "l0": l0, "fvu": 0.2, "heldout_rel_l2": 0.4, "heldout_fvu": 0.25}
        for c, l0 in ((0.05, 40.0), (0.1, 25.0), (0.2, 9.0))]}))


def handmade(rows=ROWS):
    """The study's pipeline with the upstream stages replaced by the hand-built outputs above."""

    def corpus(config, stage, run):
        write_corpus(config, run, stage.path, rows)

    def saes(config, stage, run):
        write_saes(config, run)
        stage.update(l1=0.1)  # the coefficient the saes stage records (tiny.yaml lets the sweep choose)

    fake = {"data": lambda *_: None, "base": lambda *_: None, "adapters": lambda *_: None, "corpus": corpus,
            "saes": saes}
    return tuple(dataclasses.replace(s, run=fake.get(s.name, s.run)) for s in PIPELINE)


def build_run(tmp_path: pathlib.Path, *overrides: str, rows=ROWS, gs_layers=LAYERS):
    """A run directory whose data..saes stages are complete, with a Gemma Scope-format dictionary dir."""
    gs_dir = tmp_path / "gemma_scope"
    write_gemma_scope_dir(gs_dir, gs_layers)
    config = make_config(tmp_path, gs_dir, *overrides)
    pipeline = handmade(rows)
    run_stages(config, "saes", pipeline=pipeline, echo=lambda line: None)
    return config, open_run(config, pipeline)


def analyze(config, run: Run, target: str = "analysis") -> dict:
    run_stages(config, target, pipeline=run.pipeline, echo=lambda line: None)
    return json.loads(results_path(run).read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    config, run = build_run(tmp)
    results = analyze(config, run, target="report")
    return config, run, results


def _in(value, lo, hi):
    return value is not None and np.isfinite(value) and lo <= value <= hi


def test_every_table_present_finite_and_in_range(finished):
    _, _, results = finished
    meta = results["meta"]
    assert meta["probe_overlaps_train"] is True and meta["activation_dtype"] == "float32"
    for split, rows in ROWS.items():
        for name in meta["adapters"]:
            for layer in LAYERS:
                cell = results["table4"][split][name][f"L{layer}"]
                assert cell["count"] == rows and cell["mean_norm"] > 0 and cell["ratio"] > 0
    for layer in LAYERS:
        record = results["layers"][f"L{layer}"]
        assert _in(record["base"]["dictionary_on_base"]["rel_l2"], 0, np.inf)
        assert set(record["base"]["base_saes"]) == {"0", "1"}  # only a base SAE serving as dictionary is excluded
        for name in meta["adapters"]:
            cell = record["adapters"][name]
            for errors in (cell["table5"]["direct"], cell["table5"]["difference"], *cell["table6"].values()):
                assert errors["n_tokens"] == ROWS["heldout"]
                assert all(_in(errors[e], 0, np.inf) for e in ERROR_NAMES)
            assert all(_in(cell["table7"][e], -np.inf, 100) for e in ERROR_NAMES)
            t8 = cell["table8"]
            for key in ("overlap", "overlap_pooled", "null_chance", "null_chance_pooled", "null_shuffled"):
                assert _in(t8[key], 0, 1), key
            assert _in(t8["active_delta"], 0, GS_WIDTH) and t8["tokens_with_active"] > 0
            t9 = cell["table9"]
            assert 0 < t9["live"] <= WIDTH and _in(t9["dead_fraction"], 0, 1)
            for comparison in ("delta_vs_dictionary", "random_directions", "random_init", "seed_to_seed",
                               "base_vs_dictionary"):
                for variant, lo in (("signed", -1), ("abs", 0)):
                    s = t9[comparison][variant]
                    assert _in(s["mean"], lo, 1) and _in(s["median"], lo, 1)
                    assert _in(s["pct_below"], 0, 100) and _in(s["pct_above"], 0, 100)
                a = cell["table10"][comparison]
                assert _in(a["mean"], 0, 90) and _in(a["min"], 0, 90) and a["k"] == cell["table10"]["k"]
                assert _in(a["pct_near_orthogonal"], 0, 100) and _in(a["pct_aligned"], 0, 100)
            assert 1 <= cell["table10"]["k"] <= 16  # tiny.yaml subspace_k, capped by sizes
            assert _in(t9["random_directions"]["signed"]["expected"], 0, 1)
            assert "limit" in cell["table10"]["random_directions"]  # 2k <= d: Wachter's law applies
            for key in ("delta_base", "base_adapted", "null_delta_base", "null_base_adapted"):
                assert _in(cell["table11"][key], 0, 1), key
    assert [r["selected"] for r in results["table12"]["rows"]] == [False, True, False]


def test_numbers_against_numpy_on_the_corpus(finished):
    """Spot-check one cell against float64 numpy computed from the raw arrays (independent of the stage)."""
    config, run, results = finished
    acts = activations(ROWS["heldout"], seed=1)
    layer, rank = LAYERS[1], RANKS[0]
    delta, base = acts[(f"r{rank}", layer)].astype(np.float64), acts[(BASE_NAME, layer)].astype(np.float64)
    with np.load(pathlib.Path(config.analysis.gemma_scope_dir) / f"layer_{layer}/width_16k/average_l0_{GS_L0[layer]}"
                 "/params.npz") as npz:
        p = {k: npz[k].astype(np.float64) for k in npz.files}
    pre = delta @ p["W_enc"] + p["b_enc"]
    f = np.where(pre > p["threshold"], pre, 0.0)
    err = np.linalg.norm(delta - (f @ p["W_dec"] + p["b_dec"]), axis=1) / np.linalg.norm(delta, axis=1)
    cell = results["layers"][f"L{layer}"]["adapters"][f"r{rank}"]
    np.testing.assert_allclose(cell["table5"]["direct"]["rel_l2"], err.mean(), rtol=1e-4)

    def cka(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    np.testing.assert_allclose(cell["table11"]["delta_base"], cka(delta, base), rtol=1e-4)
    np.testing.assert_allclose(cell["table11"]["base_adapted"], cka(base, base + delta), rtol=1e-4)
    mean_norm = np.linalg.norm(delta, axis=1).mean()
    np.testing.assert_allclose(results["table4"]["heldout"][f"r{rank}"][f"L{layer}"]["mean_norm"], mean_norm,
                               rtol=1e-6)


def test_report_files(finished):
    config, run, results = finished
    out = run.stage_dir("report")
    text = (out / REPORT_FILE).read_text()
    for heading in [f"## Table {i}" for i in range(4, 13)] + ["## Appendix: the paper's tables"]:
        assert heading in text, heading
    assert "probe split overlaps" in text and "`float32`" in text
    assert "86.2" in text  # the paper's Table 7 L5 r4, in the appendix
    assert "null: random directions" in text and "null: seed to seed" in text
    rows = (out / FIGURES_CSV).read_text().splitlines()
    assert rows[0] == "table,adapter,rank,layer,metric,value,paper" and len(rows) > 500
    figures = json.loads((out / FIGURES_JSON).read_text())
    assert figures["results"] == results and len(figures["rows"]) == len(rows) - 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"max_cosine_hist.png", "principal_angles.png", "cka_by_layer.png", "heatmap_table9.png"} <= set(pngs)
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    for p in pngs:
        assert f"]({p})" in text


def test_resume_skips_finished_layers(finished, tmp_path):
    """A stage interrupted after its first layer redoes only the rest and gives the same numbers."""
    config, run, results = finished
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    manifest_path = copy / "analysis" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["done"] == [f"L{layer}" for layer in LAYERS]
    manifest.update(status="running", done=[f"L{LAYERS[0]}"])  # as if killed after the first layer
    manifest_path.write_text(json.dumps(manifest))
    (copy / "analysis" / "layers" / f"L{LAYERS[1]}.json").unlink()
    (copy / "analysis" / "results.json").unlink()
    first = copy / "analysis" / "layers" / f"L{LAYERS[0]}.json"
    first.write_text(first.read_text().replace('"n_tokens": 1100', '"n_tokens": 1101', 1))  # marks "not redone"
    config2 = load_config(CONFIG, [*_overrides(config), f"run_dir={copy}"])
    run2 = open_run(config2, run.pipeline)
    assert run2.check("analysis").state is StageState.RESUMABLE
    assert run2.manifest("analysis").done == (f"L{LAYERS[0]}",)
    resumed = analyze(config2, run2)
    assert resumed["layers"][f"L{LAYERS[1]}"] == results["layers"][f"L{LAYERS[1]}"]
    assert '"n_tokens": 1101' in first.read_text()  # the finished layer was not recomputed


def test_base_sae_as_dictionary(tmp_path):
    """Builtin runs: the dictionary is base SAE seed 0, so base-base uses the other seed, never itself."""
    config, run = build_run(tmp_path, "analysis.gemma_scope_dir=null", f"extract.layers=[{LAYERS[0]}]",
                            f"lora.ranks=[{RANKS[0]}]")
    results = analyze(config, run)
    record = results["layers"][f"L{LAYERS[0]}"]
    assert set(record["base"]["base_saes"]) == {"1"} and "own base SAE" in results["meta"]["dictionary"]
    t9 = record["adapters"][f"r{RANKS[0]}"]["table9"]
    assert t9["base_vs_dictionary"]["base_seed"] == 1 and t9["base_vs_dictionary"]["signed"]["mean"] < 0.99
    # the dictionary reconstructs h_base exactly as base SAE seed 0 does
    seed0 = load_sae(base_sae_dir(run, LAYERS[0], 0))
    x = activations(ROWS["heldout"], seed=1)[(BASE_NAME, LAYERS[0])]
    err = np.linalg.norm(x - np.asarray(seed0.reconstruct(x)), axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(record["base"]["dictionary_on_base"]["rel_l2"], err.mean(), rtol=1e-4)


def test_missing_gemma_scope_layer(tmp_path):
    config, run = build_run(tmp_path, gs_layers=LAYERS[:1])
    with pytest.raises(ValueError, match=rf"layer {LAYERS[1]}: Gemma Scope SAE .*layer_{LAYERS[1]}.*not found"):
        analyze(config, run)


def test_dictionary_width_mismatch(tmp_path):
    config, run = build_run(tmp_path)
    path = pathlib.Path(config.analysis.gemma_scope_dir) / f"layer_{LAYERS[0]}/width_16k/average_l0_{GS_L0[LAYERS[0]]}"
    rng = np.random.default_rng(0)
    np.savez(path / "params.npz", W_enc=rng.normal(size=(D + 3, GS_WIDTH)).astype(np.float32),
             W_dec=rng.normal(size=(GS_WIDTH, D + 3)).astype(np.float32), b_enc=np.zeros(GS_WIDTH, np.float32),
             b_dec=np.zeros(D + 3, np.float32), threshold=np.zeros(GS_WIDTH, np.float32))
    match = rf"layer {LAYERS[0]}: dictionary \(Gemma Scope\) has d_in={D + 3}.*d_model={D}"
    with pytest.raises(ValueError, match=match):
        analyze(config, run)


def test_empty_evaluation_split(tmp_path):
    config, run = build_run(tmp_path, rows={"probe": 96, "heldout": 0})
    with pytest.raises(ValueError, match="corpus split 'heldout' .* has no tokens"):
        analyze(config, run)


def test_saelens_directory_as_dictionary(tmp_path):
    """`analysis.dictionary_dirs`: a SAELens directory is the reference for a layer, read as SAELens stores it."""
    from lgeo_jax.sae import write_saelens

    reference = random_relu_sae(4242, 2.0, width=GS_WIDTH)
    write_saelens(reference, tmp_path / "saelens_L1")
    layer = LAYERS[0]
    config, run = build_run(tmp_path, f"extract.layers=[{layer}]", f"lora.ranks=[{RANKS[0]}]",
                            f'analysis.dictionary_dirs={{"{layer}": "{tmp_path / "saelens_L1"}"}}')
    results = analyze(config, run)
    record = results["layers"][f"L{layer}"]
    assert results["meta"]["dictionary_paths"][f"L{layer}"] == str(tmp_path / "saelens_L1")
    # the dictionary's reconstruction of h_base is the SAELens SAE's (scale folded into its weights on export)
    x = activations(ROWS["heldout"], seed=1)[(BASE_NAME, layer)]
    err = np.linalg.norm(x - np.asarray(reference.reconstruct(x)), axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(record["base"]["dictionary_on_base"]["rel_l2"], err.mean(), rtol=1e-4)
    assert record["adapters"][f"r{RANKS[0]}"]["table9"]["dictionary_rows"] == GS_WIDTH
