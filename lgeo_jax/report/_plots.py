"""The report's figures (matplotlib, Agg backend, no display), each returned with its one-line caption.

Every figure labels its axes and colour bars, uses one colour scale or axis range across its panels (fixed
by what the metric can take, not by the data's spread), draws the nulls (hatched heatmap cells where a
number is indistinguishable from its null; null bands and lines elsewhere), puts a legend on every panel
and uses integer layer ticks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen before pyplot loads
import numpy as np
from matplotlib.patches import Patch

from lgeo_jax.files import atomic_save_figure
from lgeo_jax.report._crosscoder import crosscoder_plots
from lgeo_jax.report._splice import splice_plots

Figure = tuple[str, str]  # (file name, caption)
COMPARISON_STYLE = {  # comparison -> (label, colour)
    "delta_vs_dictionary": ("delta SAE vs dictionary", "C0"),
    "random_init": ("null: random-init SAE", "C1"),
    "random_directions": ("null: random directions", "C7"),
    "seed_to_seed": ("ceiling: seed to seed", "C2"),
    "base_vs_dictionary": ("base SAE vs dictionary", "C3"),
}


def _get(record: Any, path: str) -> Any:
    for key in path.split("."):
        record = record.get(key) if isinstance(record, Mapping) else None
    return record


def _num(m: Any) -> float:
    v = m.get("value") if isinstance(m, Mapping) else m
    return np.nan if v is None else float(v)


def _bounds(m: Any) -> tuple[float, float]:
    if not isinstance(m, Mapping):
        return np.nan, np.nan
    return _num(m.get("ci_low")), _num(m.get("ci_high"))


def _yerr(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> list[np.ndarray]:
    """Error-bar lengths from an interval; a percentile interval may exclude its point (a skewed statistic such
    as the smallest angle), and then the bar on that side has length 0 rather than a negative one."""
    return [np.maximum(values - low, 0.0), np.maximum(high - values, 0.0)]


def _save(fig, out_dir: Path, stem: str, fmt: str) -> str:
    name = f"{stem}.{fmt}"
    atomic_save_figure(fig, out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _cells(results: Mapping[str, Any]) -> tuple[list[str], list[int], Any]:
    meta = results["meta"]
    return meta["adapters"], meta["layers"], lambda a, layer: results["layers"][f"L{layer}"]["adapters"][a]


def heatmaps(results: Mapping[str, Any], out_dir: Path, fmt: str) -> list[Figure]:
    adapters, layers, cell = _cells(results)
    seed = str(results["meta"]["sae_seeds"][0])
    headline = results["layers"][f"L{layers[0]}"]["dictionary"]["headline_recon"]
    specs = (  # stem, table, path, title, colour-bar label, fixed range (None: [0, max(1, data)]), what the null
        # is (verdicts hatch), the path of a reference drawn on the colour bar and its name
        ("heatmap_table5", "table5", f"{headline}.rel_l2", f"T5: dictionary, {headline}", "rel_l2 (1 = no better "
         "than predicting 0)", None, None, "mean_delta.rel_l2", "mean-δ baseline"),
        ("heatmap_table6", "table6", f"{seed}.rel_l2", f"T6: delta SAE seed {seed}", "rel_l2", None, None,
         "mean_delta.rel_l2", "mean-δ baseline"),
        ("heatmap_table7", "table7", f"{headline}.rel_l2", f"T7: improvement over {headline}", "improvement %",
         (-100.0, 100.0), None, None, None),
        ("heatmap_table8", "table8", "all.overlap", "T8: overlap of δ and h_base features", "overlap fraction",
         (0.0, 1.0), "the shuffled-token overlap", "all.null_shuffled", "shuffled-token null"),
        ("heatmap_table9", "table9", "delta_vs_dictionary.mean", "T9: mean max-cosine", "max cosine", (0.0, 1.0),
         "the random-init SAE", "random_init.mean", "random-init null"),
        ("heatmap_table10", "table10", "delta_vs_dictionary.mean", "T10: mean principal angle", "degrees",
         (0.0, 90.0), "the random-init SAE", "random_init.mean", "random-init null"),
        ("heatmap_table11", "table11", "delta_base", "T11: CKA(δ, h_base)", "linear CKA", (0.0, 1.0),
         "δ of random other tokens", "null_delta_base", "shuffled-δ null"),
    )
    out = []
    for stem, table, path, title, label, fixed, null, ref_path, ref_name in specs:
        # the baseline table of a reference may differ from the plotted one (T6 against T5's mean-δ baseline)
        ref_table = "table5" if ref_path == "mean_delta.rel_l2" else table
        measures = [[_get(cell(a, layer).get(table, {}), path) for layer in layers] for a in adapters]
        grid = np.array([[_num(m) for m in row] for row in measures])  # [A, L], NaN where undefined
        vmin, vmax = fixed or (0.0, max(1.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0))
        fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(layers), 1.2 + 0.7 * len(adapters)))
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(adapters)), adapters)
        ax.set_xlabel("layer")
        ax.set_ylabel("adapter")
        for i, row in enumerate(measures):
            for j, m in enumerate(row):
                if not np.isfinite(grid[i, j]):
                    ax.text(j, i, "undefined", ha="center", va="center", fontsize=7, color="0.4")
                    continue
                lo, hi = _bounds(m)
                shade = (grid[i, j] - vmin) / (vmax - vmin)
                bounds = "[—]" if not np.isfinite(lo) else f"[{lo:.3g}, {hi:.3g}]"
                if np.isfinite(lo) and not lo <= grid[i, j] <= hi:
                    bounds += "†"  # the value lies outside its interval (report.md explains)
                ax.text(j, i, f"{grid[i, j]:.3g}\n{bounds}", ha="center", va="center", fontsize=7,
                        color="black" if shade > 0.6 else "white")
                if null and isinstance(m, Mapping) and m.get("vs_null") == 0:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.85",
                                               linewidth=0))
        if null:
            ax.legend(handles=[Patch(facecolor="none", edgecolor="0.5", hatch="///",
                                     label=f"indistinguishable from {null}")], loc="upper center",
                      bbox_to_anchor=(0.5, -0.25 if len(adapters) > 2 else -0.4), fontsize=7, frameon=False)
        ax.set_title(title, fontsize=10)
        bar = fig.colorbar(im, ax=ax, label=label)
        caption = f"{title}, value and 95% interval per (adapter, layer); colour scale fixed to [{vmin:g}, {vmax:g}]"
        if ref_path:
            refs = [_num(_get(cell(a, layer).get(ref_table, {}), ref_path)) for a in adapters for layer in layers]
            if np.isfinite(refs).any():  # the reference's range over the cells, marked on the colour bar
                lo, hi = np.nanmin(refs), np.nanmax(refs)
                bar.ax.axhspan(lo, max(hi, lo + 0.004 * (vmax - vmin)), color="red", alpha=0.8)
                caption += f"; the red mark on the colour bar is the {ref_name} ({lo:.3g}-{hi:.3g})"
        caption += f"; hatched cells are indistinguishable from {null}." if null else "."
        out.append((_save(fig, out_dir, stem, fmt), caption))
    return out


def _grid_axes(adapters, layers, **kwargs):
    fig, axes = plt.subplots(len(adapters), len(layers), figsize=(3.4 * len(layers), 2.6 * len(adapters)),
                             squeeze=False, **kwargs)
    return fig, axes


def max_cosine_histograms(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                          fmt: str) -> Figure:
    adapters, layers, cell = _cells(results)
    pooled = np.concatenate([v for layer in layers for k, v in arrays[layer].items() if k.endswith("/max_cos")])
    bins = np.linspace(min(0.0, float(pooled.min())), 1.0, 61)  # one range for every panel, null and signal visible
    fig, axes = _grid_axes(adapters, layers, sharex=True)
    for i, a in enumerate(adapters):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            for comparison, (label, colour) in COMPARISON_STYLE.items():
                values = arrays[layer].get(f"{a}/{comparison}/max_cos")
                if values is not None:
                    ax.hist(values, bins=bins, density=True, histtype="step", color=colour, label=label,
                            linewidth=1.6 if comparison == "delta_vs_dictionary" else 1.0)
            t9 = cell(a, layer)["table9"]
            null = t9["random_init"]["mean"]
            ax.axvspan(_num(null["ci_low"]), _num(null["ci_high"]), color="C1", alpha=0.2,
                       label="random-init mean, 95% band")
            ax.axvline(_num(t9["delta_vs_dictionary"]["mean"]), color="C0", linestyle="--", label="delta SAE mean")
            ax.set_title(f"{a} L{layer}", fontsize=9)
            ax.legend(fontsize=5, loc="best", framealpha=0.6)
            if i == len(adapters) - 1:
                ax.set_xlabel("max cosine with the dictionary")
            if j == 0:
                ax.set_ylabel("density")
    fig.tight_layout()
    caption = ("Max cosine of each live delta-SAE row (seed 0) with the dictionary, against a random-init SAE and "
               "random directions (one draw each; the shaded band is the random-init null's 95% band for the mean) "
               "and the seed-to-seed ceiling; same bins in every panel. A signal sits right of the orange band.")
    return _save(fig, out_dir, "max_cosine_hist", fmt), caption


def angle_spectra(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                  fmt: str) -> Figure:
    adapters, layers, _ = _cells(results)
    fig, axes = _grid_axes(adapters, layers, sharey=True)
    for i, a in enumerate(adapters):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            for comparison, (label, colour) in COMPARISON_STYLE.items():
                angles = arrays[layer].get(f"{a}/{comparison}/angles")
                if angles is None:
                    continue
                if comparison == "random_directions":
                    label = "null: random subspaces"
                index = np.arange(1, angles.shape[-1] + 1)
                if angles.ndim == 2:  # Monte Carlo draws: their mean and central 95% per angle index
                    lo, hi = np.percentile(angles, [2.5, 97.5], axis=0)
                    ax.fill_between(index, lo, hi, color=colour, alpha=0.2)
                    angles = angles.mean(axis=0)
                ax.plot(index, angles, color=colour, label=label)
            ax.set_ylim(0, 90)
            ax.set_title(f"{a} L{layer}", fontsize=9)
            ax.legend(fontsize=5.5, loc="lower right")
            if i == len(adapters) - 1:
                ax.set_xlabel("principal angle index (ascending)")
            if j == 0:
                ax.set_ylabel("angle (deg)")
    fig.tight_layout()
    caption = ("Principal angles between the top-k subspaces of the delta SAE (seed 0) and the dictionary, sorted, "
               "against random subspaces and random-init SAEs (lines: mean of the draws, bands: their 95%); curves "
               "below the bands are more aligned than chance.")
    return _save(fig, out_dir, "principal_angles", fmt), caption


def cka_by_layer(results: Mapping[str, Any], out_dir: Path, fmt: str) -> Figure:
    adapters, layers, cell = _cells(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("delta_base", "null_delta_base", "CKA(δ, h_base)", "linear CKA"),
              ("base_adapted", "null_base_adapted", "CKA(h_base, h_adapted)", "linear CKA"),
              ("variance_ratio", None, "tr Cov(δ) / tr Cov(h_base)", "variance ratio"))
    x = np.asarray(layers, float)
    for ax, (key, null_key, title, ylabel) in zip(axes, panels, strict=True):
        for i, a in enumerate(adapters):
            ms = [cell(a, layer)["table11"][key] for layer in layers]
            values = np.array([_num(m) for m in ms])
            lo, hi = np.array([_bounds(m) for m in ms]).T
            offset = (i - (len(adapters) - 1) / 2) * 0.06  # side by side, so the error bars do not overlap
            ax.errorbar(x + offset, values, yerr=_yerr(values, lo, hi), fmt="o-", color=f"C{i}", capsize=3,
                        label=a)
            if null_key:
                ns = [cell(a, layer)["table11"][null_key] for layer in layers]
                nlo, nhi = np.array([_bounds(m) for m in ns]).T
                ax.plot(x, [_num(m) for m in ns], ":", color=f"C{i}", label=f"{a} null (shuffled δ)")
                ax.fill_between(x, nlo, nhi, color=f"C{i}", alpha=0.15)
        ax.set_xticks(layers, [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if key == "base_adapted":  # every value sits near 1: zoom in so the null band can be told apart
            shown = [v for line in ax.lines for v in np.asarray(line.get_ydata(), float) if np.isfinite(v)]
            low = min(shown) if shown else 0.0
            ax.set_ylim(max(0.0, low - 0.2 * (1.0 - low) - 1e-3), 1.0 + 0.05 * (1.0 - low) + 1e-4)
        elif null_key:
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    caption = ("Linear CKA by layer with 95% prompt-bootstrap intervals; dotted lines and bands are the nulls "
               "(δ of random other tokens of the split). The middle panel is zoomed: CKA(h_base, h_adapted) is near 1 "
               "because the variance ratio on the right is small, and only a gap to its null band is a finding.")
    return _save(fig, out_dir, "cka_by_layer", fmt), caption


def k_sweep(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
            fmt: str) -> Figure:
    adapters, layers, cell = _cells(results)
    fig, axes = plt.subplots(2, len(layers), figsize=(3.8 * len(layers), 6.4), squeeze=False)
    for j, layer in enumerate(layers):
        top, bottom = axes[0, j], axes[1, j]
        for i, a in enumerate(adapters):
            sweep = cell(a, layer)["table10_k"]
            ks = np.array(sweep["ks"])
            ms = [sweep["cells"][str(k)]["delta_vs_dictionary"]["mean"] for k in ks]
            values = np.array([_num(m) for m in ms])
            lo, hi = np.array([_bounds(m) for m in ms]).T
            top.errorbar(ks, values, yerr=_yerr(values, lo, hi), fmt="o-", color=f"C{i}", capsize=3, label=a)
            if i == 0:
                init = [sweep["cells"][str(k)]["random_init"]["mean"] for k in ks]
                top.fill_between(ks, *np.array([_bounds(m) for m in init]).T, color="0.5", alpha=0.25,
                                 label="null: random-init SAE (95%)")
                rand = [_num(sweep["cells"][str(k)]["random_subspaces"]["mean"]) for k in ks]
                top.plot(ks, rand, "k:", label="null: random subspaces")
            spec = arrays[layer].get(f"{a}/spectrum")
            if spec is not None:
                bottom.semilogy(np.arange(1, spec.size + 1), spec, color=f"C{i}", label=a)
        spec = arrays[layer].get(f"{adapters[0]}/dictionary_spectrum")
        if spec is not None:
            bottom.semilogy(np.arange(1, spec.size + 1), spec, color="k", linestyle="--", label="dictionary")
        k = cell(adapters[0], layer)["table10"]["k"]
        bottom.axvline(k, color="0.5", linewidth=0.8, label=f"Table 10's k = {k}")
        top.set_xscale("log", base=2)
        all_ks = sorted({k for a in adapters for k in cell(a, layer)["table10_k"]["ks"]})
        top.set_xticks(all_ks, [str(k) for k in all_ks])
        top.set_ylim(0, 90)
        top.set_title(f"L{layer}", fontsize=10)
        top.set_xlabel("subspace size k")
        bottom.set_xlabel("singular value index")
        if j == 0:
            top.set_ylabel("mean principal angle (deg)")
            bottom.set_ylabel("share of squared singular values")
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    fig.tight_layout()
    caption = ("Top: Table 10's mean angle against k with 95% intervals, beside the random-init band and random "
               "subspaces (the paper's section 6.3). Bottom: the decoders' singular spectra (row-normalised live "
               "rows); a flat spectrum means the top-k subspace is barely defined.")
    return _save(fig, out_dir, "k_sensitivity", fmt), caption


def density(results: Mapping[str, Any], out_dir: Path, fmt: str) -> Figure:
    adapters, layers, cell = _cells(results)
    meta = results["meta"]
    seed = str(meta["sae_seeds"][0])
    ranks = np.asarray(meta["ranks"], float)
    grid = [[cell(a, layer)["table6"][seed]["l0"] for layer in layers] for a in adapters]  # [A, L] measures
    values = np.array([[_num(m) for m in row] for row in grid])
    bounds = np.array([[_bounds(m) for m in row] for row in grid])  # [A, L, 2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, a in enumerate(adapters):
        left.errorbar(layers, values[i], yerr=_yerr(values[i], bounds[i, :, 0], bounds[i, :, 1]), fmt="o-",
                      color=f"C{i}", capsize=3, label=a)
    for j, layer in enumerate(layers):
        right.errorbar(ranks, values[:, j], yerr=_yerr(values[:, j], bounds[:, j, 0], bounds[:, j, 1]),
                       fmt="s-", color=f"C{j}", capsize=3, label=f"L{layer}")
    left.set_xticks(layers, [str(layer) for layer in layers])
    left.set_xlabel("layer")
    right.set_xscale("log", base=2)
    right.set_xticks(ranks, [str(int(r)) for r in ranks])
    right.set_xlabel("LoRA rank")
    for ax in (left, right):
        ax.set_ylabel(f"delta-SAE L0 (seed {seed})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    left.set_title("density by depth")
    right.set_title("density by rank")
    fig.tight_layout()
    caption = ("Feature density (active latents per token) of the delta SAEs on the evaluation split with 95% "
               "prompt-bootstrap intervals, by depth and by rank; the report's trend table tests the slopes against 0.")
    return _save(fig, out_dir, "density", fmt), caption


def lora_span_plot(results: Mapping[str, Any], out_dir: Path, fmt: str) -> list[Figure]:
    """Share of δ in the span against its random-subspace null, per layer, one line per adapter."""
    meta = results["meta"]
    adapters, layers = meta["adapters"], meta["layers"]
    recs = {(a, layer): results["layers"][f"L{layer}"]["adapters"][a].get("lora_span")
            for a in adapters for layer in layers}
    if not any(r and r["span_dim"] for r in recs.values()):
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.asarray(layers, float)
    for i, a in enumerate(adapters):
        shares = [(recs[(a, layer)] or {}).get("delta_variance_in_span") for layer in layers]
        values = np.array([_num(m) for m in shares])
        lo, hi = np.array([_bounds(m) for m in shares]).T
        offset = (i - (len(adapters) - 1) / 2) * 0.06
        left.errorbar(x + offset, values, yerr=_yerr(values, lo, hi), fmt="o-", color=f"C{i}", capsize=3, label=a)
        nulls = [(m or {}).get("null") for m in shares]
        left.plot(x, [_num(m) for m in nulls], ":", color=f"C{i}", label=f"{a} null (random S-dim subspace)")
        left.fill_between(x, *np.array([_bounds(m) for m in nulls]).T, color=f"C{i}", alpha=0.15)
        dims = [(recs[(a, layer)] or {}).get("span_dim", np.nan) for layer in layers]
        right.plot(x, dims, "o-", color=f"C{i}", label=f"{a}: span dim S")
        ranks = [_num((recs[(a, layer)] or {}).get("effective_rank")) for layer in layers]
        right.plot(x, ranks, "s--", color=f"C{i}", label=f"{a}: effective rank of δ")
    d_model = results["meta"].get("d_model")
    if d_model:
        right.axhline(d_model, color="k", linewidth=0.8, label="d_model")
    for ax in (left, right):
        ax.set_xticks(layers, [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ax.legend(fontsize=6, ncol=2)
    left.set_ylim(0, 1.02)
    left.set_ylabel("share of δ's (uncentred) variance in the span")
    left.set_title("δ inside the LoRA write span")
    right.set_ylim(bottom=0)
    right.set_ylabel("dimensions")
    right.set_title("span dimension and δ's effective rank")
    fig.tight_layout()
    caption = ("Left: the share of δ's variance inside the subspace the adapter's o_proj / down_proj factors can write "
               "into by each layer, with 95% prompt-bootstrap intervals; dotted lines and bands: the same share in "
               "random subspaces of the span's dimension (a signal sits above its band; at S = d_model both are 1). "
               "Right: the span's dimension, δ's effective rank (participation ratio) and d_model.")
    return [(_save(fig, out_dir, "lora_span", fmt), caption)]


def write_plots(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                fmt: str = "png") -> list[Figure]:
    """Every figure into `out_dir`; returns (file name, caption) pairs."""
    return [*heatmaps(results, out_dir, fmt), max_cosine_histograms(results, arrays, out_dir, fmt),
            angle_spectra(results, arrays, out_dir, fmt), k_sweep(results, arrays, out_dir, fmt),
            cka_by_layer(results, out_dir, fmt), density(results, out_dir, fmt),
            *lora_span_plot(results, out_dir, fmt), *crosscoder_plots(results, out_dir, fmt),
            *splice_plots(results, out_dir, fmt)]
