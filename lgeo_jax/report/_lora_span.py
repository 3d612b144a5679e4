"""The report's LoRA-span linkage section (each (adapter, layer) cell's `lora_span` record, written by
`lgeo_jax.analysis.span_record`) and its plot: is δ inside the subspace the adapter's o_proj / down_proj
factors can write into, how many directions does it use against the rank r, and how do the delta SAE's and
δ's own top subspaces sit against that span, each beside a random subspace of the span's dimension. Its
figures.json rows come with the other cell tables (table `lora_span`, `lgeo_jax.report._figures`); its plot is
`lgeo_jax.report._plots.lora_span_plot`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lgeo_jax.report._view import VERDICT, View, ci, fmt, table

KEY = "lora_span"


def _null(m: Any, digits: int) -> str:
    if not isinstance(m, Mapping) or "null" not in m:
        return "—"
    return ci(m["null"], digits)


def _shown(m: Any, digits: int) -> str:
    """The number (with its interval where it has one) and its verdict."""
    return ci(m, digits, verdict=True) if isinstance(m, Mapping) else "—"


def lora_span_section(results: Mapping[str, Any], view: View) -> str:
    cells = [(a, layer, view.cell(a, layer).get(KEY)) for a, layer in view.cells()]
    cells = [(a, layer, rec) for a, layer, rec in cells if rec is not None]
    if not cells:
        return "No LoRA-span record in this run's analysis (it predates the linkage)."
    rtol = cells[0][2]["span_rtol"]
    head = ("The write span by layer L: the union of the column spaces of the scaled LoRA updates s·B·A of o_proj "
            "(and down_proj when it is a target) at every block <= L, with directions below "
            f"{rtol:g} of the largest singular value dropped; S = its dimension beside d_model and the rank r. "
            "Only these projections write into the residual "
            "directly (q/k/v reach it through the base o_proj, and Gemma-2's post-norms rescale each write), so the "
            "share is how much of δ the direct writes can hold. Share = Σ‖Pδ‖² / Σ‖δ‖² (uncentred) [95% prompt "
            "bootstrap]; effective rank = participation ratio of δ's centred covariance [basic prompt bootstrap]; "
            "n90 / n99 = principal components for 90% / 99% of the variance; angles (deg) between the span and the "
            "delta SAE's top-k decoder subspace (mean over seeds) or δ's top-k principal components. Nulls: random "
            "subspaces of dimension S (for the effective rank and counts, a structureless signal filling one); "
            f"verdicts {VERDICT[1]} above / {VERDICT[-1]} below / {VERDICT[0]} indistinguishable (angles and counts: "
            "the point against the null's interval). When S = d_model the span is the whole space: the share is 1 "
            "and the angles 0 for δ and null alike, which says nothing about the adapter.")
    rows = []
    for a, layer, rec in cells:
        dims = f"{rec['span_dim']} / {rec['d_model']} / r{rec['rank']}" + (" (fills)" * rec["span_fills_space"])
        if rec["span_dim"] == 0:
            rows.append([a, f"L{layer}", dims, *(["—"] * 9)])
            continue
        share, er = rec["delta_variance_in_span"], rec["effective_rank"]
        sae, pca = rec["angles_sae_vs_span"]["mean"], rec["angles_pca_vs_span"]["mean"]
        rows.append([a, f"L{layer}", dims, _shown(share, 3), _null(share, 3), _shown(er, 2), _null(er, 2),
                     f"{fmt(rec['components_90']['value'], 0)} / {fmt(rec['components_99']['value'], 0)} "
                     f"(null {fmt(rec['components_90']['null']['value'], 1)} / "
                     f"{fmt(rec['components_99']['null']['value'], 1)})",
                     str(rec.get("k", "—")), _shown(sae, 1), _shown(pca, 1), _null(pca, 1)])
    header = ["adapter", "layer", "S / d_model / rank", "share of δ in span", "null share", "effective rank",
              "null eff. rank", "n90 / n99", "k", "angle SAE-span", "angle PCA-span", "null angle"]
    return head + "\n\n" + table(header, rows)
