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
from lgeo_jax.lora import init_adapters, save_adapter
from lgeo_jax.report import FIGURES_CSV, FIGURES_JSON, REPORT_FILE
from lgeo_jax.sae import SAE, SAEConfig, init_params, load_sae, save_sae
from lgeo_jax.stages import (
    PIPELINE,
    Run,
    StageState,
    adapter_dirs,
    base_checkpoint,
    base_sae_dir,
    corpus_store,
    delta_sae_dir,
    health_path,
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
TOKENS_PER_PROMPT = 11  # held-out rows 11 p .. 11 p + 10 are prompt p's tokens (the corpus' sample_index)
FAST = ("analysis.null_samples=20", "analysis.n_boot=100", "analysis.subspace_boot=20",  # the minimum counts
        "crosscoder.batch_size=32", "crosscoder.steps=20", "crosscoder.eval_rows=64",  # fits the hand-built corpus
        "splice.enabled=false")  # the hand-built base checkpoint has no weights to splice (tests/test_splice.py)


def make_config(root: pathlib.Path, gs_dir: pathlib.Path, *extra: str):
    return load_config(CONFIG, [
        f"run_dir={root / 'run'}", f"lora.ranks={list(RANKS)}", f"extract.layers={list(LAYERS)}",
        f"sae.seeds={list(SEEDS)}", f"analysis.gemma_scope_dir={gs_dir}",
        f"analysis.gemma_scope_l0={json.dumps({str(k): v for k, v in GS_L0.items()})}",
        *FAST, *extra])


def _overrides(config) -> list[str]:
    """The overrides `make_config` applied (run_dir aside), to rebuild the same config elsewhere."""
    return [f"lora.ranks={list(RANKS)}", f"extract.layers={list(LAYERS)}", f"sae.seeds={list(SEEDS)}",
            f"analysis.gemma_scope_dir={config.analysis.gemma_scope_dir}",
            f"analysis.gemma_scope_l0={json.dumps({str(k): v for k, v in GS_L0.items()})}", *FAST]


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
                values = (1000 * i + 7 * (np.arange(n) // TOKENS_PER_PROMPT) if field == "sample_index"
                          else np.zeros(n))  # sparse dataset indices, as real prompts have
                arrays[(split, "meta", field)][:].write(values.astype(np.int32)).result()
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


N_PARAMS = 435_776  # the base model's parameter count the fake base stage records (Table 2's denominator)


def write_health(config, run: Run) -> None:
    """`saes/health.json` in the saes stage's schema: every SAE healthy but one, and one warning."""
    saes = [{"name": f"r{rank}_L{layer}_s{seed}", "adapter": f"r{rank}", "layer": layer, "seed": seed}
            for rank in RANKS for layer in LAYERS for seed in SEEDS]
    saes += [{"name": f"base_L{layer}_s{seed}", "adapter": "base", "layer": layer, "seed": seed}
             for layer in LAYERS for seed in SEEDS]
    for i, entry in enumerate(saes):
        entry |= {"l0": 10.0 + i, "dead_fraction": 0.01 * i, "cos_to_init_median": 0.5, "moved_fraction": 0.8,
                  "heldout_fvu": 0.2, "healthy": 1, "problems": []}
    saes[1] |= {"healthy": 0, "moved_fraction": 0.2, "problems": ["only 20% of decoder rows moved"]}
    health_path(run).write_text(json.dumps({"d_in": D, "l0_target": [4, 32], "dead_window_tokens": 5000,
                                            "saes": saes, "warnings": ["off target: L0 40 outside [4, 32]"]}))


def handmade(rows=ROWS, health=True):
    """The study's pipeline with the upstream stages replaced by the hand-built outputs above."""

    def base(config, stage, run):
        base_checkpoint(run, config).mkdir(parents=True)  # the files downstream stages fingerprint
        (base_checkpoint(run, config) / "config.json").write_text("{}")
        stage.update(n_params=N_PARAMS)

    def adapters(config, stage, run):
        # random LoRA factors of the tiny shape: the analysis reads them for the LoRA-span linkage
        stack = init_adapters(config.model.builtin.with_vocab(16), config.lora.adapter_specs(), random_b=True)
        for i, path in enumerate(adapter_dirs(run, config)):
            save_adapter(stack, path, index=i)
        (stage.path / "summary.json").write_text(json.dumps({"adapters": {
            f"r{r}": {"rank": r, "trainable_params": 672 * r, "final_train_loss": 2.0 - 0.01 * r,
                      "heldout_loss_before": 1.9, "heldout_loss_after": 1.8} for r in RANKS}}))

    def corpus(config, stage, run):
        write_corpus(config, run, stage.path, rows)

    def saes(config, stage, run):
        write_saes(config, run)
        if health:
            write_health(config, run)
        stage.update(l1=0.1)  # the coefficient the saes stage records (tiny.yaml lets the sweep choose)

    fake = {"data": lambda *_: None, "base": base, "adapters": adapters, "corpus": corpus, "saes": saes}
    return tuple(dataclasses.replace(s, run=fake.get(s.name, s.run)) for s in PIPELINE)


def build_run(tmp_path: pathlib.Path, *overrides: str, rows=ROWS, gs_layers=LAYERS, health=True):
    """A run directory whose data..saes stages are complete, with a Gemma Scope-format dictionary dir."""
    gs_dir = tmp_path / "gemma_scope"
    write_gemma_scope_dir(gs_dir, gs_layers)
    config = make_config(tmp_path, gs_dir, *overrides)
    pipeline = handmade(rows, health)
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


def _measured(m, lo=-np.inf, hi=np.inf, centre="value"):
    """A reported number: finite and within [lo, hi], its interval ordered and around `centre` (None: the
    interval need not hold the value, for statistics that shift under resampling)."""
    ok = (isinstance(m, dict) and all(_in(m[k], lo, hi) for k in ("value", "ci_low", "ci_high"))
          and m["ci_low"] <= m["ci_high"])
    return ok and (centre is None or m["ci_low"] - 1e-9 <= m[centre] <= m["ci_high"] + 1e-9)


def test_every_table_present_with_intervals_and_verdicts(finished):
    _, _, results = finished
    meta = results["meta"]
    assert meta["probe_overlaps_train"] is True and meta["activation_dtype"] == "float32"
    assert meta["eval_prompts"] == -(-ROWS["heldout"] // TOKENS_PER_PROMPT)
    assert results["table2"]["total_params"] == N_PARAMS
    assert results["table2"]["adapters"]["r4"]["pct_of_total"] == pytest.approx(100 * 672 * 4 / N_PARAMS)
    assert results["health"]["warnings"] == ["off target: L0 40 outside [4, 32]"]  # copied from the saes stage
    for split, rows in ROWS.items():
        for name in meta["adapters"]:
            for layer in LAYERS:
                cell = results["table4"][split][name][f"L{layer}"]
                assert cell["count"] == rows and cell["mean_norm"] > 0 and cell["ratio"] > 0
    for layer in LAYERS:
        record = results["layers"][f"L{layer}"]
        assert record["dictionary"]["headline_recon"] == "difference"  # the Gemma Scope stand-in has a b_dec
        assert _measured(record["base"]["dictionary"]["rel_l2"], 0)
        assert set(record["base"]) == {"dictionary", "base_s0", "base_s1"}  # no base SAE serves as dictionary here
        for name in meta["adapters"]:
            cell = record["adapters"][name]
            assert _measured(cell["table4"]["mean_norm"], 0) and _measured(cell["table4"]["ratio"], 0)
            for recon in ("direct", "difference", "zero_input", "mean_delta"):
                for e in ERROR_NAMES:
                    fixed_mean = recon == "mean_delta" and e == "fvu"  # see below
                    assert _measured(cell["table5"][recon][e], 0, centre=None if fixed_mean else "value"), recon
                    assert _measured(cell["table7"][recon][e], -np.inf, 100, centre=None), recon
            # predicting by the split's mean: FVU exactly 1 on the split, and a resample (whose own mean differs
            # from that fixed predictor) can only do worse, so the interval lies at or above 1
            fvu = cell["table5"]["mean_delta"]["fvu"]
            assert fvu["value"] == pytest.approx(1.0) and fvu["ci_low"] >= 1.0 - 1e-9
            for seed in SEEDS:
                assert all(_measured(cell["table6"][str(seed)][e], 0) for e in (*ERROR_NAMES, "l0"))
                assert 0 < cell["table6"][str(seed)]["train"]["live"] <= WIDTH
            for variant in ("all", "nonzero"):
                t8 = cell["table8"][variant]
                for key in ("overlap", "overlap_pooled", "null_chance", "null_shuffled"):
                    assert _measured(t8[key], 0, 1), (variant, key)
                assert t8["overlap"]["vs_null"] in (-1, 0, 1)
            t9 = cell["table9"]
            assert t9["seeds"] == list(SEEDS) and all(0 < t9["live"][str(s)] <= WIDTH for s in SEEDS)
            for comparison in ("delta_vs_dictionary", "random_directions", "random_init", "seed_to_seed",
                               "base_vs_dictionary"):
                for stat, (lo, hi) in {"mean": (-1, 1), "median": (-1, 1), "pct_below": (0, 100),
                                       "pct_above": (0, 100), "abs_mean": (0, 1), "mnn": (0, 1)}.items():
                    assert _measured(t9[comparison][stat], lo, hi), (comparison, stat)
            assert all(t9["delta_vs_dictionary"][s]["vs_null"] in (-1, 0, 1) for s in ("mean", "mnn"))
            t10 = cell["table10"]
            assert 1 <= t10["k"] <= 16  # tiny.yaml subspace_k, capped by sizes
            for comparison in ("delta_vs_dictionary", "random_subspaces", "random_init"):
                # a resample's subspace is noisier, so the latent-bootstrap interval need not hold the point
                for stat in ("mean", "min"):
                    assert _measured(t10[comparison][stat], 0, 90, centre=None), (comparison, stat)
            assert t10["delta_vs_dictionary"]["mean"]["vs_null"] in (-1, 0, 1)
            assert "limit" in t10["random_subspaces"] and _in(t10["energy_top_k"], 0, 1)
            assert t10["k"] in cell["table10_k"]["ks"] and len(cell["table10_k"]["ks"]) > 1
            for key in ("delta_base", "base_adapted", "null_delta_base", "null_base_adapted"):
                # CKA's basic interval is centred on the bias-corrected value, not on the plain one
                assert _measured(cell["table11"][key], 0, 1, centre="bias_corrected"), key
            assert _measured(cell["table11"]["variance_ratio"], 0)
            assert cell["table11"]["base_adapted"]["vs_null"] in (-1, 0, 1)
    assert [r["selected"] for r in results["table12"]["rows"]] == [False, True, False]
    assert set(results["density_trends"]) == {"rank_slope", "depth_slope"}


def test_figures_json_rows_carry_intervals_and_verdicts(finished):
    """Acceptance: `.ci_low` / `.ci_high` beside every headline metric, `.vs_null` on Tables 9-11, Table 11's new null
    and variance ratio, Table 5's zero_input baseline, and the `saes` training-health rows."""
    config, run, _ = finished
    rows = json.loads((run.stage_dir("report") / FIGURES_JSON).read_text())["rows"]
    by_key = {(r["table"], r["adapter"], r["layer"], r["metric"]): r for r in rows}
    for table, metric in (("table4", "mean_norm"), ("table5", "difference.rel_l2"), ("table5", "zero_input.rel_l2"),
                          ("table5", "mean_delta.rel_l2"), ("table6", "0.rel_l2"), ("table7", "difference.rel_l2"),
                          ("table8", "all.overlap"), ("table9", "delta_vs_dictionary.mean"),
                          ("table10", "delta_vs_dictionary.mean"), ("table11", "delta_base"),
                          ("table11", "base_adapted"), ("table11", "null_base_adapted"),
                          ("table11", "variance_ratio")):
        for adapter in (f"r{r}" for r in RANKS):
            for layer in LAYERS:
                low, value, high = (by_key[(table, adapter, layer, metric + suffix)]["value"]
                                    for suffix in (".ci_low", "", ".ci_high"))
                assert low <= high and np.isfinite(value), (table, metric)
    for table, metric in (("table9", "delta_vs_dictionary.mean"), ("table9", "delta_vs_dictionary.mnn"),
                          ("table10", "delta_vs_dictionary.mean"), ("table11", "delta_base"),
                          ("table11", "base_adapted")):
        assert by_key[(table, "r4", LAYERS[0], metric + ".vs_null")]["value"] in (-1, 0, 1)
    assert by_key[("table5", "r4", LAYERS[0], "direct.rel_l2")]["paper"] is None  # tiny layers are not the paper's
    assert by_key[("table2", "r4", None, "trainable_params")]["paper"] == 4_472_832
    health = [r for r in rows if r["table"] == "saes"]
    assert len(health) == 6 * (len(RANKS) + 1) * len(LAYERS) * len(SEEDS)
    assert by_key[("saes", "base", LAYERS[0], "1.healthy")]["value"] == 1
    assert by_key[("saes", "r4", LAYERS[0], "1.healthy")]["value"] == 0


def _cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_numbers_against_numpy_on_the_corpus(finished):
    """Spot-check one cell against float64 numpy computed from the raw arrays (independent of the stage)."""
    config, run, results = finished
    acts = activations(ROWS["heldout"], seed=1)
    layer, rank = LAYERS[1], RANKS[0]
    delta, base = acts[(f"r{rank}", layer)].astype(np.float64), acts[(BASE_NAME, layer)].astype(np.float64)
    with np.load(pathlib.Path(config.analysis.gemma_scope_dir) / f"layer_{layer}/width_16k/average_l0_{GS_L0[layer]}"
                 "/params.npz") as npz:
        p = {k: npz[k].astype(np.float64) for k in npz.files}

    def recon(x):
        pre = x @ p["W_enc"] + p["b_enc"]
        return np.where(pre > p["threshold"], pre, 0.0) @ p["W_dec"] + p["b_dec"]

    norm = np.linalg.norm(delta, axis=1)
    cell = results["layers"][f"L{layer}"]["adapters"][f"r{rank}"]
    for name, x_hat in (("direct", recon(delta)), ("difference", recon(base + delta) - recon(base)),
                        ("zero_input", recon(np.zeros((1, D)))), ("mean_delta", delta.mean(0))):
        err = np.linalg.norm(delta - x_hat, axis=1) / norm
        np.testing.assert_allclose(cell["table5"][name]["rel_l2"]["value"], err.mean(), rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(cell["table11"]["delta_base"]["value"], _cka(delta, base), rtol=1e-4)
    np.testing.assert_allclose(cell["table11"]["base_adapted"]["value"], _cka(base, base + delta), rtol=1e-4)
    # the null: h_base against h_base + delta of random other tokens (one permutation of the whole split)
    partner = np.random.default_rng([config.analysis.null_seed, layer]).permutation(ROWS["heldout"])
    np.testing.assert_allclose(cell["table11"]["null_base_adapted"]["value"], _cka(base, base + delta[partner]),
                               rtol=1e-4)
    np.testing.assert_allclose(cell["table11"]["variance_ratio"]["value"],
                               np.sum((delta - delta.mean(0)) ** 2) / np.sum((base - base.mean(0)) ** 2), rtol=1e-6)
    np.testing.assert_allclose(cell["table4"]["mean_norm"]["value"], norm.mean(), rtol=1e-6)
    np.testing.assert_allclose(results["table4"]["heldout"][f"r{rank}"][f"L{layer}"]["mean_norm"], norm.mean(),
                               rtol=1e-6)


def test_report_files(finished):
    config, run, results = finished
    out = run.stage_dir("report")
    text = (out / REPORT_FILE).read_text()
    assert text.index("## Training health of the SAEs") < text.index("## Table 2")  # the report opens with it
    for heading in ["## Table 2", *[f"## Table {i}" for i in range(4, 13)], "## Feature density by rank and depth",
                    "## Table 10 by k", "## Appendix: the paper's tables"]:
        assert heading in text, heading
    assert "**Warning: 1 of 12 SAEs are unhealthy**" in text and "off target: L0 40 outside [4, 32]" in text
    assert "Built-in model, synthetic data" in text  # tiny.yaml's builtin model, even with a stand-in dictionary
    assert "## Table 5: Gemma Scope reconstructing δ" in text  # a Gemma Scope directory is configured here
    assert "probe split overlaps" in text and "`float32`" in text
    assert "86.2" in text and "4,472,832" in text  # the paper's Table 7 (appendix) and Table 2 beside ours
    assert "paper L5" in text  # the paper's rows for its layers, labelled, under ours
    cell = results["layers"][f"L{LAYERS[0]}"]["adapters"]["r4"]["table9"]["delta_vs_dictionary"]["mean"]
    assert f"{cell['value']:.4f} [{cell['ci_low']:.4f}, {cell['ci_high']:.4f}]" in text  # a number with its interval
    rows = (out / FIGURES_CSV).read_text().splitlines()
    assert rows[0] == "table,adapter,rank,layer,metric,value,paper" and len(rows) > 2000
    figures = json.loads((out / FIGURES_JSON).read_text())
    crosscoder = figures["results"].pop("crosscoder")  # the report stage adds the crosscoders stage's record
    assert crosscoder["enabled"] and len(crosscoder["crosscoders"]) == len(config.lora.ranks) * len(LAYERS)
    assert figures["results"].pop("splice") == {"enabled": False}  # and the evaluate stage's
    assert figures["results"] == results and len(figures["rows"]) == len(rows) - 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"max_cosine_hist.png", "principal_angles.png", "cka_by_layer.png", "heatmap_table9.png",
            "k_sensitivity.png", "density.png"} <= set(pngs)
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    for p in pngs:  # every plot linked, with a one-line caption in italics right below it
        link = text.index(f"]({p})")
        caption = text[link:].split("\n\n")[1]
        assert caption.startswith("*") and caption.endswith("*") and len(caption) > 40, (p, caption)


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
    first.write_text(first.read_text().replace('"tokens": 1100', '"tokens": 1101', 1))  # marks "not redone"
    config2 = load_config(CONFIG, [*_overrides(config), f"run_dir={copy}"])
    run2 = open_run(config2, run.pipeline)
    assert run2.check("analysis").state is StageState.RESUMABLE
    assert run2.manifest("analysis").done == (f"L{LAYERS[0]}",)
    resumed = analyze(config2, run2)
    assert resumed["layers"][f"L{LAYERS[1]}"] == results["layers"][f"L{LAYERS[1]}"]
    assert '"tokens": 1101' in first.read_text()  # the finished layer was not recomputed


def test_base_sae_as_dictionary(tmp_path):
    """Builtin runs: the dictionary is base SAE seed 0, so base-base uses the other seed, never itself; the report
    names the dictionary for what it is and says when there is no training-health record."""
    config, run = build_run(tmp_path, "analysis.gemma_scope_dir=null", f"extract.layers=[{LAYERS[0]}]",
                            f"lora.ranks=[{RANKS[0]}]", health=False)
    results = analyze(config, run, target="report")
    record = results["layers"][f"L{LAYERS[0]}"]
    assert set(record["base"]) == {"dictionary", "base_s1"} and "own base SAE" in results["meta"]["dictionary"]
    assert results["meta"]["dictionary_kind"] == ["own_base_sae"] and results["health"] is None
    t9 = record["adapters"][f"r{RANKS[0]}"]["table9"]
    assert t9["base_vs_dictionary"]["base_seeds"] == [1] and t9["base_vs_dictionary"]["mean"]["value"] < 0.99
    # the dictionary reconstructs h_base exactly as base SAE seed 0 does
    seed0 = load_sae(base_sae_dir(run, LAYERS[0], 0))
    x = activations(ROWS["heldout"], seed=1)[(BASE_NAME, LAYERS[0])]
    err = np.linalg.norm(x - np.asarray(seed0.reconstruct(x)), axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(record["base"]["dictionary"]["rel_l2"]["value"], err.mean(), rtol=1e-4)
    text = (run.stage_dir("report") / REPORT_FILE).read_text()
    assert "No training-health record" in text and "Gemma Scope reconstructing" not in text
    assert "this run's own base SAE, not Gemma Scope" in text


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
    assert results["meta"]["dictionary_paths"][f"L{layer}"]["path"] == str(tmp_path / "saelens_L1")
    # the dictionary's reconstruction of h_base is the SAELens SAE's (scale folded into its weights on export)
    x = activations(ROWS["heldout"], seed=1)[(BASE_NAME, layer)]
    err = np.linalg.norm(x - np.asarray(reference.reconstruct(x)), axis=1) / np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(record["base"]["dictionary"]["rel_l2"]["value"], err.mean(), rtol=1e-4)
    assert record["adapters"][f"r{RANKS[0]}"]["table9"]["dictionary_rows"] == GS_WIDTH
