"""`report.md`: every table of the analysis, each number beside its nulls and the paper's value.

Grid tables (layer rows x rank columns) show "ours (paper)" where the paper has that cell; long tables
(one row per adapter and layer) carry the nulls in their own columns. The paper's own tables follow in
an appendix, so they are visible even when a run's layers or ranks differ from the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lgeo_jax.report import _paper as paper
from lgeo_jax.report._figures import paper_value

DASH = "—"


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _get(record: Mapping, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(record, Mapping) or key not in record:
            return None
        record = record[key]
    return record


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class _View:
    """Read access to `results.json` by (adapter, layer)."""

    def __init__(self, results: Mapping[str, Any], with_paper: bool):
        self.results = results
        self.meta = results["meta"]
        self.with_paper = with_paper
        self.adapters = list(self.meta["adapters"])
        self.ranks = dict(zip(self.adapters, self.meta["ranks"], strict=True))
        self.layers = list(self.meta["layers"])
        self.primary = self.meta["sae_seeds"][0]

    def cell(self, adapter: str, layer: int) -> Mapping[str, Any]:
        return self.results["layers"][f"L{layer}"]["adapters"][adapter]

    def value(self, adapter: str, layer: int, table_name: str, path: str) -> Any:
        return _get(self.cell(adapter, layer).get(table_name, {}), path)

    def with_paper_value(self, text: str, table_name: str, path: str, adapter: str, layer: int, digits: int) -> str:
        if not self.with_paper:
            return text
        p = paper_value(table_name, path, self.ranks[adapter], layer, self.primary)
        return text if p is None else f"{text} ({fmt(p, digits)})"

    def grid(self, table_name: str, path: str, digits: int = 3) -> str:
        header = ["layer", *self.adapters]
        rows = []
        for layer in self.layers:
            row = [f"L{layer}"]
            for a in self.adapters:
                text = fmt(self.value(a, layer, table_name, path), digits)
                row.append(self.with_paper_value(text, table_name, path, a, layer, digits))
            rows.append(row)
        return table(header, rows)

    def long(self, columns: Sequence[tuple[str, Callable[[str, int], str]]]) -> str:
        rows = [[a, f"L{layer}", *(render(a, layer) for _, render in columns)]
                for a in self.adapters for layer in self.layers]
        return table(["adapter", "layer", *(name for name, _ in columns)], rows)


def _col(view: _View, table_name: str, path: str, digits: int = 3) -> Callable[[str, int], str]:
    return lambda a, layer: fmt(view.value(a, layer, table_name, path), digits)


def _setup(view: _View) -> str:
    m = view.meta
    lines = [
        f"- Reference dictionary: {m['dictionary']}",
        f"- Evaluation split: `{m['eval_split']}` ({m['eval_tokens']} tokens); SAEs trained on "
        f"`{m['sae_train_split']}`, seeds {m['sae_seeds']} (seed {view.primary} reported, others give the "
        f"seed-to-seed null), L1 {m['sae_l1']:g}",
        f"- Residual stream dtype during extraction: `{m['activation_dtype']}`; corpus stored as `{m['store_dtype']}`",
        f"- Table 10: top-{m['subspace_k']} subspaces (capped by sizes; actual k per cell below), near-orthogonal "
        f">= {m['near_orthogonal_deg']:g} deg, aligned <= {m['aligned_deg']:g} deg; random nulls over "
        f"{m['null_samples']} subspace pairs",
        f"- Table 8 activity threshold: f > {m['active_threshold']:g}; Tables 9-10 use live latents only (fired at "
        "least once on the evaluation split)",
    ]
    cells = [view.cell(a, layer) for a in view.adapters for layer in view.layers]
    if not any("seed_to_seed" in c["table9"] for c in cells):
        lines.append("- Seed-to-seed null: not available (needs two or more `sae.seeds`)")
    if not any("base_vs_dictionary" in c["table9"] for c in cells):
        lines.append("- Base-base null: not available (needs base SAEs other than the one used as the dictionary: "
                     "`sae.base_saes` with a Gemma Scope directory, or two or more `sae.seeds` without one)")
    if m["probe_overlaps_train"]:
        lines.append("- **Warning: the probe split overlaps the adapters' training split** (the paper's setup): probe "
                     "activations come from examples the adapters were trained on.")
    return "\n".join(lines)


def _errors(view: _View) -> str:
    p = str(view.primary)
    cols = []
    for label, tab, base in (("T5", "table5", "direct."), ("T5 diff", "table5", "difference."),
                             (f"T6 s{p}", "table6", f"{p}."), ("T7 %", "table7", ""),
                             ("T7 diff %", "table7_difference", "")):
        digits = 1 if tab.startswith("table7") else 3
        for name in ("rel_l2", "rel_l2_pooled", "fvu"):
            cols.append((f"{label} {name}", _col(view, tab, base + name, digits)))
    return view.long(cols)


def _table8(view: _View) -> str:
    cols = [(name, _col(view, "table8", key, digits)) for name, key, digits in (
        ("overlap", "overlap", 4), ("pooled", "overlap_pooled", 4), ("null: chance", "null_chance", 4),
        ("null: shuffled tokens", "null_shuffled", 4), ("active on delta", "active_delta", 2),
        ("active on h_base", "active_base", 2), ("tokens with active", "tokens_with_active", 0))]
    if view.with_paper:
        cols.append(("paper overlap / active", lambda a, layer: " / ".join(
            fmt(paper_value("table8", k, view.ranks[a], layer), d) for k, d in (("overlap", 4), ("active_delta", 2)))))
    return view.long(cols)


def _table9(view: _View) -> str:
    def dead(a, layer):
        cell = view.cell(a, layer)["table9"]
        return f"{cell['live']}/{cell['width']} ({100 * cell['dead_fraction']:.1f}% dead)"

    def random(a, layer):
        sig = view.value(a, layer, "table9", "random_directions.signed")
        return f"{fmt(sig['mean'], 4)} (exact {fmt(sig.get('expected'), 4)})"

    cols = [("live latents", dead)]
    cols += [(name, _col(view, "table9", f"delta_vs_dictionary.signed.{key}", d)) for name, key, d in (
        ("mean", "mean", 4), ("median", "median", 4), ("% < 0.3", "pct_below", 2), ("% > 0.7", "pct_above", 2))]
    cols += [("mean abs", _col(view, "table9", "delta_vs_dictionary.abs.mean", 4)),
             ("null: random directions", random),
             ("null: random-init SAE", _col(view, "table9", "random_init.signed.mean", 4)),
             ("null: seed to seed", _col(view, "table9", "seed_to_seed.signed.mean", 4)),
             ("null: base vs dictionary", _col(view, "table9", "base_vs_dictionary.signed.mean", 4))]
    if view.with_paper:
        cols.append(("paper mean", lambda a, layer: fmt(
            paper_value("table9", "delta_vs_dictionary.signed.mean", view.ranks[a], layer), 4)))
    return view.long(cols)


def _table10(view: _View) -> str:
    def random(a, layer):
        cell = view.value(a, layer, "table10", "random_directions")
        limit = cell.get("limit")
        return f"{fmt(cell['mean'], 2)}" + ("" if limit is None else f" (limit {fmt(limit['mean'], 2)})")

    cols = [("k", _col(view, "table10", "k"))]
    cols += [(name, _col(view, "table10", f"delta_vs_dictionary.{key}", d)) for name, key, d in (
        ("mean deg", "mean", 2), ("min deg", "min", 2), ("% near-orthogonal", "pct_near_orthogonal", 1),
        ("% aligned", "pct_aligned", 1))]
    cols += [("null: random subspaces", random),
             ("null: random-init SAE", _col(view, "table10", "random_init.mean", 2)),
             ("null: seed to seed", _col(view, "table10", "seed_to_seed.mean", 2)),
             ("null: base vs dictionary", _col(view, "table10", "base_vs_dictionary.mean", 2))]
    out = view.long(cols)
    if view.with_paper:
        s = paper.TABLE10_SUMMARY
        out += (f"\n\nPaper: mean angles {s['mean_min']}-{s['mean_max']} deg per cell, overall "
                f"{s['mean_overall']} deg, {s['pct_near_orthogonal']}% near-orthogonal, {s['pct_aligned']}% aligned "
                "(top-256 subspaces of 16,384 x 3,584 decoders; random 256-dim subspaces of R^3584 average ~76.7 deg).")
    return out


def _table11(view: _View) -> str:
    def with_paper(key):
        def render(a, layer):
            return view.with_paper_value(fmt(view.value(a, layer, "table11", key), 3), "table11", key, a, layer, 3)
        return render

    return view.long([("CKA(delta, h_base)", with_paper("delta_base")),
                      ("null: CKA(delta, shuffled h_base)", _col(view, "table11", "null_delta_base")),
                      ("CKA(h_base, h_adapted)", with_paper("base_adapted")),
                      ("null: CKA(shuffled h_base, h_adapted)", _col(view, "table11", "null_base_adapted"))])


def _table12(results: Mapping[str, Any], with_paper: bool) -> str:
    sweep = results.get("table12")
    if not sweep:
        return "Not run (`sae.l1_sweep` is empty)."
    rows = [[fmt(r["l1"], 3), fmt(r["l0"], 1), fmt(r["heldout_rel_l2"]), fmt(r["heldout_fvu"]), fmt(r["fvu"]),
             fmt(r["selected"])] for r in sweep["rows"]]
    pre = sweep["arm"] == "pre_norm"
    arm = ("pre-normalisation arm (`sae.normalize: none`: the SAEs saw raw activations)" if pre else
           "post-normalisation arm (`sae.normalize: rms`: the SAEs saw x / s)")
    out = (f"Adapter {sweep['adapter']}, layer {sweep['layer']}, {arm}; selected L1 {sweep['selected_l1']:g}.\n\n"
           + table(["L1", "L0", "held-out rel_l2", "held-out fvu", "train fvu", "selected"], rows))
    if with_paper:
        post = "; ".join(f"L1 {p['l1']} -> L0 {p['l0']}" + (" (selected)" if p["selected"] else "")
                         for p in paper.TABLE12_SWEEP)
        pre_l0 = " / ".join(f"{v:g}" for v in paper.TABLE12_PRE_NORM_L0)
        out += (f"\n\nPaper (layer 5, rank 4), pre-normalisation coefficients: L0 {pre_l0} (coefficients not "
                f"stated); post-normalisation: {post}." if pre else
                f"\n\nPaper (layer 5, rank 4), post-normalisation: {post}; pre-normalisation coefficients gave L0 "
                f"{pre_l0}.")
    return out


def _table4(results: Mapping[str, Any], view: _View) -> str:
    parts = []
    for split, by_adapter in results["table4"].items():
        rows = []
        for layer in view.layers:
            row = [f"L{layer}"]
            for a in view.adapters:
                c = by_adapter[a][f"L{layer}"]
                text = f"{fmt(c['mean_norm'], 2)} / {fmt(c['ratio'], 4)}"
                row.append(view.with_paper_value(text, "table4", f"{split}.mean_norm", a, layer, 2))
            row.append(fmt(by_adapter[view.adapters[0]][f"L{layer}"]["base_mean_norm"], 2))
            rows.append(row)
        parts.append(f"Split `{split}`: mean ‖δ‖ / (mean ‖δ‖ ÷ mean ‖h_base‖)\n\n"
                     + table(["layer", *view.adapters, "mean ‖h_base‖"], rows))
    return "\n\n".join(parts)


def _appendix() -> str:
    def paper_grid(grid: Mapping[int, Mapping[int, float]], digits: int) -> str:
        rows = [[f"L{layer}", *(fmt(row.get(r), digits) for r in paper.PAPER_RANKS)] for layer, row in grid.items()]
        return table(["layer", *(f"r{r}" for r in paper.PAPER_RANKS)], rows)

    parts = ["## Appendix: the paper's tables (Gemma-2-9B, Gemma Scope width_16k)"]
    for title, grid, digits in (
        ("Table 4, mean ‖δ‖", paper.TABLE4_MEAN_DELTA_NORM, 2),
        ("Table 5, Gemma Scope relative error on delta", paper.TABLE5_GEMMA_SCOPE_ERROR, 3),
        ("Table 6, delta-SAE held-out error", paper.TABLE6_DELTA_SAE_ERROR, 3),
        ("Table 7, improvement %", paper.TABLE7_IMPROVEMENT_PCT, 1),
        ("Table 8, overlap", paper.TABLE8_OVERLAP, 4),
        ("Table 8, active features on delta per token", paper.TABLE8_ACTIVE_FEATURES, 2),
        ("Table 11, CKA(delta, h_base)", paper.TABLE11_CKA_DELTA_BASE, 3),
        ("Table 11, CKA(h_base, h_adapted)", paper.TABLE11_CKA_BASE_ADAPTED, 3),
    ):
        parts.append(f"### {title}\n\n{paper_grid(grid, digits)}")
    t9 = [[f"r{r}", f"L{layer}", *(fmt(v.get(k), 4 if k in ("mean", "median") else 2)
                                   for k in ("mean", "median", "pct_below", "pct_above"))]
          for (r, layer), v in paper.TABLE9_MAX_COSINE.items()]
    header = ["rank", "layer", "mean", "median", "% < 0.3", "% > 0.7"]
    parts.append("### Table 9, max cosine vs Gemma Scope (paper's stated random baseline: "
                 f"{paper.TABLE9_CLAIMED_RANDOM:.3f})\n\n" + table(header, t9))
    return "\n\n".join(parts)


def render_markdown(results: Mapping[str, Any], *, title: str, with_paper: bool, plots: Sequence[str] = ()) -> str:
    """The whole report as markdown; `plots` are file names (relative to report.md) to link."""
    view = _View(results, with_paper)
    paren = " (paper in parentheses)" if with_paper else ""
    sections = [
        f"# {title}",
        "## Setup\n\n" + _setup(view),
        f"## Table 4: delta norms{paren}\n\n" + _table4(results, view),
        f"## Table 5: dictionary (Gemma Scope) relative error on delta, rel_l2{paren}\n\n"
        + view.grid("table5", "direct.rel_l2"),
        "### Table 5, second column: recon(h_adapted) - recon(h_base) against delta, rel_l2\n\n"
        + view.grid("table5", "difference.rel_l2"),
        f"## Table 6: delta-SAE held-out relative error, rel_l2 (seed {view.primary}){paren}\n\n"
        + view.grid("table6", f"{view.primary}.rel_l2"),
        f"## Table 7: improvement % = 1 - E_delta / E_dictionary, rel_l2{paren}\n\n" + view.grid("table7", "rel_l2", 1),
        "### Tables 5-7, every error definition (rel_l2 mean of ratios, pooled, fvu) on the same tokens\n\n"
        + _errors(view),
        "## Table 8: dictionary features active on delta that are also active on h_base\n\n" + _table8(view),
        "## Table 9: max cosine of delta-SAE decoder rows (live latents) against the dictionary\n\n" + _table9(view),
        "## Table 10: principal angles between top-k subspaces of row-normalised decoders\n\n" + _table10(view),
        f"## Table 11: linear CKA over the evaluation tokens{paren}\n\n" + _table11(view),
        "## Table 12: L1 sweep\n\n" + _table12(results, with_paper),
    ]
    if plots:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{p}]({p})" for p in plots))
    if with_paper:
        sections.append(_appendix())
    return "\n\n".join(sections) + "\n"
