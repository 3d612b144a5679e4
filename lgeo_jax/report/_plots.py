"""The report's figures (matplotlib, Agg backend, no display): rank x layer heatmaps, max-cosine histograms
against the random null, principal-angle spectra against their nulls, CKA by layer with its null."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen before pyplot loads
import numpy as np

from lgeo_jax.files import atomic_save_figure

HEATMAPS = (  # file stem, table, dotted path in the cell, title
    ("heatmap_table5", "table5", "direct.rel_l2", "T5: dictionary rel_l2 on delta"),
    ("heatmap_table6", "table6", None, "T6: delta-SAE rel_l2"),
    ("heatmap_table7", "table7", "rel_l2", "T7: improvement %"),
    ("heatmap_table8", "table8", "overlap", "T8: overlap"),
    ("heatmap_table9", "table9", "delta_vs_dictionary.signed.mean", "T9: mean max-cosine"),
    ("heatmap_table10", "table10", "delta_vs_dictionary.mean", "T10: mean principal angle (deg)"),
    ("heatmap_table11", "table11", "delta_base", "T11: CKA(delta, h_base)"),
)
COMPARISON_STYLE = {  # comparison -> (label, colour)
    "delta_vs_dictionary": ("delta SAE vs dictionary", "C0"),
    "random_directions": ("random directions", "C7"),
    "random_init": ("random-init SAE", "C1"),
    "seed_to_seed": ("seed to seed", "C2"),
    "base_vs_dictionary": ("base SAE vs dictionary", "C3"),
}


def _get(record: Mapping, path: str) -> Any:
    for key in path.split("."):
        record = record.get(key) if isinstance(record, Mapping) else None
    return record


def _save(fig, out_dir: Path, stem: str, fmt: str) -> str:
    name = f"{stem}.{fmt}"
    fig.tight_layout()
    atomic_save_figure(fig, out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def heatmaps(results: Mapping[str, Any], out_dir: Path, fmt: str) -> list[str]:
    meta = results["meta"]
    adapters, layers, seed = meta["adapters"], meta["layers"], str(meta["sae_seeds"][0])
    names = []
    for stem, table, path, title in HEATMAPS:
        path = path or f"{seed}.rel_l2"
        grid = np.array([[_get(results["layers"][f"L{layer}"]["adapters"][a].get(table, {}), path)
                          for layer in layers] for a in adapters], dtype=float)  # [A, L], NaN where undefined
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 1.0 + 0.6 * len(adapters)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), [f"L{layer}" for layer in layers])
        ax.set_yticks(range(len(adapters)), adapters)
        for i in range(len(adapters)):
            for j in range(len(layers)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
        names.append(_save(fig, out_dir, stem, fmt))
    return names


def _grid_figure(meta: Mapping[str, Any]):
    adapters, layers = meta["adapters"], meta["layers"]
    fig, axes = plt.subplots(len(adapters), len(layers), figsize=(3.2 * len(layers), 2.4 * len(adapters)),
                             squeeze=False)
    return fig, axes, adapters, layers


def max_cosine_histograms(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                          fmt: str) -> str:
    fig, axes, adapters, layers = _grid_figure(results["meta"])
    for i, a in enumerate(adapters):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            keys = {c: f"{a}/{c}/max_cos" for c in COMPARISON_STYLE}
            found = {c: arrays[layer][key] for c, key in keys.items() if key in arrays[layer]}
            pooled = np.concatenate(list(found.values()))
            bins = np.linspace(pooled.min(), pooled.max(), 60)  # the data's range: null and signal both visible
            for comparison, values in found.items():
                label, colour = COMPARISON_STYLE[comparison]
                ax.hist(values, bins=bins, density=True, histtype="step", color=colour, label=label)
            ax.set_title(f"{a} L{layer}", fontsize=9)
            ax.set_xlabel("max cosine", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out_dir, "max_cosine_hist", fmt)


def angle_spectra(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                  fmt: str) -> str:
    fig, axes, adapters, layers = _grid_figure(results["meta"])
    for i, a in enumerate(adapters):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            for comparison, (label, colour) in COMPARISON_STYLE.items():
                angles = arrays[layer].get(f"{a}/{comparison}/angles")
                if angles is not None:
                    angles = angles.reshape(-1, angles.shape[-1]).mean(axis=0)  # trials averaged
                    ax.plot(np.arange(1, angles.size + 1), angles, color=colour, label=label)
            ax.set_ylim(0, 90)
            ax.set_title(f"{a} L{layer}", fontsize=9)
            ax.set_xlabel("angle index", fontsize=8)
    axes[0, 0].set_ylabel("degrees")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out_dir, "principal_angles", fmt)


def cka_by_layer(results: Mapping[str, Any], out_dir: Path, fmt: str) -> str:
    meta = results["meta"]
    layers = meta["layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, a in enumerate(meta["adapters"]):
        cells = [results["layers"][f"L{layer}"]["adapters"][a]["table11"] for layer in layers]
        for ax, key in ((left, "delta_base"), (right, "base_adapted")):
            values = [np.nan if c[key] is None else c[key] for c in cells]
            nulls = [np.nan if c[f"null_{key}"] is None else c[f"null_{key}"] for c in cells]
            ax.plot(layers, values, "o-", color=f"C{i}", label=a)
            ax.plot(layers, nulls, "x:", color=f"C{i}", label=f"{a} shuffled null")
    left.set_title("CKA(delta, h_base)")
    right.set_title("CKA(h_base, h_adapted)")
    for ax in (left, right):
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
    left.legend(fontsize=7)
    return _save(fig, out_dir, "cka_by_layer", fmt)


def write_plots(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: Path,
                fmt: str = "png") -> list[str]:
    """Every figure into `out_dir`; returns their file names."""
    return [*heatmaps(results, out_dir, fmt), max_cosine_histograms(results, arrays, out_dir, fmt),
            angle_spectra(results, arrays, out_dir, fmt), cka_by_layer(results, out_dir, fmt)]
