"""Every number of the analysis as long-form rows (CSV / JSON), each with the paper's value where it has one.

A row is `{table, adapter, rank, layer, metric, value, paper}`; `metric` is the dotted path of the value
inside the analysis record (e.g. `delta_vs_dictionary.mean` in table9), so nothing is dropped and the CSV
can be filtered without knowing the record's nesting. A measured number `{"value", "ci_low", "ci_high",
"vs_null"}` gives the rows `<metric>`, `<metric>.ci_low`, `<metric>.ci_high` and `<metric>.vs_null`
(+1 above its null's interval, -1 below, 0 indistinguishable). Table `saes` holds the SAEs' training
health (one row per metric and (adapter, layer, seed); base SAEs have adapter `base`), `table2` the
adapters, `table10_k` the k sweep, `lora_span` the LoRA-weight linkage (each number's random-subspace null as
`<metric>.null`) and `density` the trends of L0 with rank (per layer) and depth (per adapter).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from typing import Any

from lgeo_jax.report import _paper as paper

FIELDS = ("table", "adapter", "rank", "layer", "metric", "value", "paper")
CELL_TABLES = ("table4", "table5", "table6", "table7", "table8", "table9", "table10", "table10_k", "table11",
               "lora_span")
HEALTH_METRICS = ("l0", "dead_fraction", "cos_to_init_median", "moved_fraction", "heldout_fvu", "healthy")


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, number) pairs of a record; a `{"value": ...}` node is named by its own path."""
    if isinstance(value, Mapping):
        if "value" in value:
            yield prefix, value["value"]
        for k, v in value.items():
            if k != "value":
                yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (int, float, bool)) or value is None:
        yield prefix, value


def paper_value(table: str, metric: str, rank: int | None, layer: int | None, primary_seed: int = 0) -> float | None:
    """The paper's number for this (table, metric, rank, layer), or None where it reports none."""
    grids = {
        ("table4", "mean_norm"): paper.TABLE4_MEAN_DELTA_NORM,
        ("table5", "direct.rel_l2"): paper.TABLE5_GEMMA_SCOPE_ERROR,
        ("table6", f"{primary_seed}.rel_l2"): paper.TABLE6_DELTA_SAE_ERROR,
        ("table7", "direct.rel_l2"): paper.TABLE7_IMPROVEMENT_PCT,
        ("table8", "all.overlap"): paper.TABLE8_OVERLAP,
        ("table8", "all.active_delta"): paper.TABLE8_ACTIVE_FEATURES,
        ("table11", "delta_base"): paper.TABLE11_CKA_DELTA_BASE,
        ("table11", "base_adapted"): paper.TABLE11_CKA_BASE_ADAPTED,
    }
    if table == "table4" and metric.endswith(".mean_norm") and "." not in metric[: -len(".mean_norm")]:
        metric = "mean_norm"  # the corpus statistics' per-split rows (`<split>.mean_norm`)
    if table == "table2":
        return paper.TABLE2_ADAPTERS.get(rank, {}).get(metric)
    if table == "table9" and metric.startswith("delta_vs_dictionary."):
        return paper.TABLE9_MAX_COSINE.get((rank, layer), {}).get(metric.split(".", 1)[1])
    grid = grids.get((table, metric))
    return None if grid is None else grid.get(layer, {}).get(rank)


def figure_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """All numbers of `results.json` as rows (see the module docstring)."""
    meta = results["meta"]
    rank_of = dict(zip(meta["adapters"], meta["ranks"], strict=True))
    primary = meta["sae_seeds"][0]
    rows: list[dict[str, Any]] = []

    def add(table, adapter, layer, metric, value, rank=None):
        rank = rank_of.get(adapter) if rank is None else rank
        rows.append({"table": table, "adapter": adapter, "rank": rank, "layer": layer, "metric": metric,
                     "value": value, "paper": paper_value(table, metric, rank, layer, primary)})

    for entry in (results.get("health") or {}).get("saes", []):
        for metric in HEALTH_METRICS:
            add("saes", entry["adapter"], entry["layer"], f"{entry['seed']}.{metric}", entry.get(metric))
    for adapter, cell in ((results.get("table2") or {}).get("adapters") or {}).items():
        for metric, value in flatten(cell):
            add("table2", adapter, None, metric, value)
    for split, by_adapter in results["table4"].items():
        for adapter, by_layer in by_adapter.items():
            for key, cell in by_layer.items():
                for metric, value in flatten(cell, split):
                    add("table4", adapter, int(key[1:]), metric, value)
    for key, record in results["layers"].items():
        layer = int(key[1:])
        for metric, value in flatten({"dictionary": record["dictionary"], **record["base"]}):
            add("base", None, layer, metric, value)
        for adapter, cell in record["adapters"].items():
            for table in CELL_TABLES:
                for metric, value in flatten(cell.get(table, {})):
                    add(table, adapter, layer, metric, value)
    trends = results.get("density_trends") or {}
    for key, cell in (trends.get("rank_slope") or {}).items():
        for metric, value in flatten(cell, "rank_slope"):
            add("density", None, int(key[1:]), metric, value)
    for adapter, cell in (trends.get("depth_slope") or {}).items():
        for metric, value in flatten(cell, "depth_slope"):
            add("density", adapter, None, metric, value)
    sweep = results.get("table12")
    if sweep:
        for row in sweep["rows"]:
            # the paper states its coefficients for the post-normalisation arm only
            paper_l0 = next((p["l0"] for p in paper.TABLE12_SWEEP if abs(p["l1"] - row["l1"]) < 1e-12), None)
            for metric in ("l0", "fvu", "heldout_rel_l2", "heldout_fvu", "selected"):
                rows.append({"table": "table12", "adapter": sweep["adapter"], "rank": rank_of.get(sweep["adapter"]),
                             "layer": sweep["layer"], "metric": f"{sweep['arm']}.l1={row['l1']:g}.{metric}",
                             "value": row[metric],
                             "paper": paper_l0 if metric == "l0" and sweep["arm"] == "post_norm" else None})
    return rows


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in FIELDS})
    return out.getvalue()
