"""The report's splice section (`results["splice"]`, the evaluate stage's `results.json`): per (adapter, layer),
KL(p_adapted || p_spliced) for each splice, the effect recovered beside the random-init SAE's (with the code's
verdict), held-out cross-entropy; its figures.json rows (table `splice`) and its plot (effect recovered with
intervals per adapter and layer)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lgeo_jax.report._figures import flatten
from lgeo_jax.report._view import VERDICT, ci, get, table

KEY = "splice"
RECOVERED = (("delta_sae", "delta SAE"), ("dictionary_difference", "dictionary difference"),
             ("random_sae", "null: random-init SAE"))


def _cells(results: Mapping[str, Any]) -> list[tuple[str, int, int, Mapping[str, Any]]]:
    """(adapter, rank, layer, record) of every evaluated cell; none when the stage was off or absent."""
    block = results.get(KEY) or {}
    if not block.get("enabled"):
        return []
    ranks = dict(zip(block["adapters"], block["ranks"], strict=True))
    return [(a, ranks[a], layer, block["cells"][a][f"L{layer}"])
            for a in block["adapters"] for layer in block["layers"]]


def splice_section(results: Mapping[str, Any]) -> str:
    block = results.get(KEY)
    if block is None:
        return "No splice record: this run has no evaluate stage output."
    cells = _cells(results)
    if not cells:
        return "Splice evaluation is off (`splice.enabled: false`)."
    head = (f"Each adapted model with its residual at layer L replaced, continued to the logits, on "
            f"{block['n_prompts']} prompts of the `{block['split']}` split, over their target (response) tokens: "
            "by h_base (the adapter's effect removed at L), h_base + the delta SAE's reconstruction of δ, "
            "h_base + recon(h_adapted) - recon(h_base) with the layer's reference dictionary, and h_base + a "
            "random-init SAE's reconstruction of δ (same shape and scale as the delta SAE: the null). Effect "
            "recovered = 1 - KL(adapted ‖ spliced) / KL(adapted ‖ base only): 1 restores the adapted model, 0 is no "
            "better than dropping the adapter's effect at L. ▲: the delta SAE recovers more than the random-init "
            "SAE (the 95% prompt-bootstrap interval of the paired difference is above 0), ▼ less, ≈ not separable.")
    rows = []
    for adapter, rank, layer, r in cells:
        delta = get(r, "effect_recovered.delta_sae")
        rows.append([adapter, f"r{rank}", f"L{layer}", ci(r["kl_base_only"], 4),
                     f"{ci(delta)} {VERDICT[delta['vs_random']]}",
                     ci(get(r, "effect_recovered.dictionary_difference")), ci(get(r, "effect_recovered.random_sae")),
                     ci(get(r, "effect_recovered.delta_sae_minus_random_sae")), ci(get(r, "ce.adapted")),
                     ci(get(r, "ce.base")), ci(get(r, "ce.delta_sae")), str(r["n_tokens"])])
    return "\n\n".join([head, table(["adapter", "rank", "layer", "KL base only", "recovered: delta SAE",
                                     "recovered: dictionary difference", "recovered: random-init SAE",
                                     "delta SAE - random", "CE adapted", "CE base", "CE delta SAE", "tokens"], rows)])


def splice_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of table `splice`: every number of each (adapter, layer) record, metric = its dotted path."""
    return [{"table": KEY, "adapter": adapter, "rank": rank, "layer": layer, "metric": metric, "value": value,
             "paper": None}
            for adapter, rank, layer, r in _cells(results) for metric, value in flatten(r)]


def splice_plots(results: Mapping[str, Any], out_dir: Path, fmt_: str) -> list[tuple[str, str]]:
    """Effect recovered per (adapter, layer) with its interval, one marker per splice; none without splices."""
    cells = _cells(results)
    if not cells:
        return []
    import matplotlib.pyplot as plt
    import numpy as np

    from lgeo_jax.report._plots import _bounds, _num, _save, _yerr  # the report's one figure style and writer

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cells) + 2), 3.8))
    x = np.arange(len(cells))
    for i, (name, label) in enumerate(RECOVERED):
        ms = [get(r, f"effect_recovered.{name}") for *_, r in cells]
        values = np.array([_num(m) for m in ms])
        low, high = np.array([_bounds(m) for m in ms]).T
        ax.errorbar(x + (i - 1) * 0.2, values, yerr=_yerr(values, low, high), fmt="os^"[i], color=f"C{i}", capsize=3,
                    linestyle="none", label=label)
    ax.axhline(1, color="k", linestyle=":", linewidth=1)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [f"{a}\nL{layer}" for a, _, layer, _ in cells], fontsize=7)
    ax.set_xlabel("adapter, layer")
    ax.set_ylabel("effect recovered (1 - KL / KL base only)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = _save(fig, out_dir, "splice_effect_recovered", fmt_)
    return [(name, "Effect recovered when the residual at layer L is replaced by h_base plus a reconstruction, "
                   "with 95% prompt-bootstrap intervals: the delta SAE, the reference dictionary's difference "
                   "reconstruction and a random-init SAE of the delta SAE's shape (the null); dotted: full recovery, "
                   "grey: none.")]
