"""The report's crosscoder section (`results["crosscoder"]`, the crosscoders stage's `results.json`): latent
classes by decoder-norm difference beside a random-init crosscoder's, decoder cosines, latent scaling (ν) per
pool, and the adapter-only latents against the delta SAE beside random-direction and random-init nulls; its
figures.json rows (table `crosscoder`) and its two plots (norm-difference histogram, ν scatter)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lgeo_jax.report._figures import flatten
from lgeo_jax.report._view import ci, fmt, get, table

KEY = "crosscoder"
CLASS_NAMES = ("base_only", "shared", "adapter_only", "other")


def _records(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    block = results.get(KEY) or {}
    return list(block.get("crosscoders") or []) if block.get("enabled") else []


def crosscoder_section(results: Mapping[str, Any]) -> str:
    block = results.get(KEY)
    if block is None:
        return "No crosscoder record: this run has no crosscoders stage output."
    records = _records(results)
    if not records:
        return "Crosscoders are off (`crosscoder.enabled: false`)."
    head = (f"{block['architecture']} crosscoders of width {block['width']} on (h_base, h_base + δ), one per "
            "(adapter, layer, seed). A latent's decoder-norm difference is 0 for base-only, 1 for adapter-only "
            "(Minder et al. 2025); a random-init crosscoder puts every latent near 0.5 (its class counts are the "
            "null). ν = β(other stream) / β(own stream) from latent scaling: near 0, the latent explains something "
            "the other model lacks; near 1, a sparsity artefact. Medians over latents with 95% bootstrap intervals.")
    class_rows, scaling_rows, sae_rows = [], [], []
    for r in records:
        name = [r["name"], f"r{r['rank']}", f"L{r['layer']}"]
        null = r["random_init_classes"]
        class_rows.append([*name, *(f"{r['classes'][c]} ({null[c]})" for c in CLASS_NAMES),
                           ci(get(r, "decoder_cosine.shared")), fmt(r.get("heldout_fvu")),
                           "yes" if r["health"]["healthy"] else "**no**"])
        for pool in ("adapter_only", "base_only"):
            s = r["scaling"][pool]
            scaling_rows.append([*name, pool, str(s["nu_recon"]["n"]), ci(s["nu_recon"]), ci(s["nu_error"])])
        comp = r.get("vs_delta_sae")
        if comp and "max_cosine" in comp:
            sae_rows.append([*name, str(comp["n_latents"]), str(comp["sae_rows"]), ci(comp["max_cosine"], verdict=True),
                             ci(comp["null_random"]), ci(comp["null_random_init"]), fmt(comp["matched_cosine"]),
                             ci(comp["null_matched_cosine"])])
    out = [head, table(["crosscoder", "rank", "layer", *(f"{c} (random init)" for c in CLASS_NAMES),
                        "shared: decoder cosine", "held-out FVU", "healthy"], class_rows),
           "Latent scaling:", table(["crosscoder", "rank", "layer", "pool", "latents", "ν reconstruction",
                                     "ν error"], scaling_rows)]
    if sae_rows:
        out += ["Adapter-only directions (adapter decoder minus base decoder) against the delta SAE's decoder rows "
                "live on the crosscoder's held-out rows; ▲ above the random-direction null):",
                table(["crosscoder", "rank", "layer", "latents", "SAE rows", "mean max-cos", "null: random directions",
                       "null: random-init crosscoder", "matched cos", "null: matched"], sae_rows)]
    else:
        out.append("No adapter-only latents (or no delta SAE of the same seed with live rows) to compare with "
                   "the delta SAEs.")
    return "\n\n".join(out)


def crosscoder_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of table `crosscoder`: every number of each record, metric `<seed>.<path>`."""
    rows = []
    for r in _records(results):
        body = {k: v for k, v in r.items() if k not in ("name", "adapter", "rank", "layer", "seed")}
        for metric, value in flatten(body):
            rows.append({"table": KEY, "adapter": r["adapter"], "rank": r["rank"], "layer": r["layer"],
                         "metric": f"{r['seed']}.{metric}", "value": value, "paper": None})
    return rows


def crosscoder_plots(results: Mapping[str, Any], out_dir: Path, fmt_: str) -> list[tuple[str, str]]:
    """The norm-difference histogram and the ν scatter; none without crosscoders."""
    records = _records(results)
    if not records:
        return []
    block = results[KEY]
    import matplotlib.pyplot as plt
    import numpy as np

    from lgeo_jax.report._plots import _save  # the report's one figure writer (atomic, closes the figure)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    edges = np.asarray(records[0]["norm_diff_hist"]["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    colours = plt.get_cmap("tab20")
    for i, r in enumerate(records):
        ax.step(centres, r["norm_diff_hist"]["counts"], where="mid", color=colours(i % 20), label=r["name"])
    ax.step(centres, records[0]["norm_diff_hist"]["random_init_counts"], where="mid", color="k", linestyle=":",
            label="null: random-init crosscoder")
    for x in block["thresholds"]:
        ax.axvline(x, color="0.6", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("decoder-norm difference (0 base-only, 0.5 shared, 1 adapter-only)")
    ax.set_ylabel("latents")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    hist = _save(fig, out_dir, "crosscoder_norm_diff", fmt_)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
    for ax, pool in zip(axes, ("adapter_only", "base_only"), strict=True):
        for i, r in enumerate(records):
            pts = r["scaling"][pool]["points"]
            if pts["nu_recon"]:
                ax.scatter(pts["nu_error"], pts["nu_recon"], s=8, color=colours(i % 20), label=r["name"])
        ax.axvline(1, color="k", linestyle=":", linewidth=1)
        ax.axhline(1, color="k", linestyle=":", linewidth=1)
        ax.set_title(f"{pool.replace('_', '-')} latents")
        ax.set_xlabel("ν error (β other / β own stream)")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no latents in this pool", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("ν reconstruction")
    fig.tight_layout()
    scatter = _save(fig, out_dir, "crosscoder_latent_scaling", fmt_)
    return [(hist, "Decoder-norm difference of every crosscoder latent (log count scale) beside a random-init "
                   "crosscoder's (dotted); grey lines: the class thresholds (base-only below the first, adapter-only "
                   "above the last, shared between the middle two)."),
            (scatter, "Latent scaling per adapter-only / base-only latent: ν error against ν reconstruction; near "
                      "(0, 0) the latent is specific to its model, near (1, 1) a sparsity artefact (dotted lines: 1).")]
