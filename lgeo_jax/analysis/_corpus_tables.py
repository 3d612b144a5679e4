"""Tables 2, 4 and 12 from the records other stages wrote: the adapters' summary, the corpus statistics, the
L1 sweep file.

Table 2 is the trainable parameters of each adapter, their share of the base model's parameters and the
final training loss. Table 4 here is the mean ||delta|| per (adapter, layer) and split that the corpus
stage accumulated during extraction (float32 values before any bf16 rounding), point values only; the
evaluation split's row, with its prompt-bootstrap interval, comes from the analysis token pass. Next to
it we give mean ||h_base|| and the ratio, since a norm alone says little about how much the adapter
moved the residual stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lgeo_jax.corpus import BASE_NAME


def table2(summary: Mapping[str, Any], adapters: Sequence[str], total_params: int | None) -> dict[str, Any]:
    """`{adapter: {rank, trainable_params, pct_of_total, final_train_loss, heldout_loss_before/after}}` from
    `adapters/summary.json` and the base model's parameter count (None: percentages unknown)."""
    by_name = summary.get("adapters")
    if not isinstance(by_name, Mapping):
        raise ValueError("adapters/summary.json: no 'adapters' record; rerun the adapters stage to completion")
    out = {}
    for name in adapters:
        if name not in by_name:
            raise ValueError(f"adapters/summary.json: no adapter '{name}' (has {sorted(by_name)})")
        a = by_name[name]
        trainable = int(a["trainable_params"])
        out[name] = {"rank": a["rank"], "trainable_params": trainable,
                     "pct_of_total": 100.0 * trainable / total_params if total_params else None,
                     "final_train_loss": a.get("final_train_loss"), "heldout_loss_before": a.get("heldout_loss_before"),
                     "heldout_loss_after": a.get("heldout_loss_after")}
    return {"total_params": total_params, "adapters": out}


def table4(stats: Mapping[str, Any], adapters: Sequence[str], layers: Sequence[int]) -> dict[str, Any]:
    """`{split: {adapter: {"L<l>": {mean_norm, base_mean_norm, ratio, count}}}}` from corpus `stats.json`."""
    splits = stats.get("splits")
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError("corpus stats.json: no 'splits' statistics; rerun the corpus stage to completion")
    out: dict[str, Any] = {}
    for split, by_name in splits.items():
        out[split] = {}
        for name in adapters:
            if name not in by_name or BASE_NAME not in by_name:
                raise ValueError(f"corpus stats.json: split '{split}' has no statistics for '{name}' or "
                                 f"'{BASE_NAME}' (has {sorted(by_name)})")
            out[split][name] = {}
            for layer in layers:
                key = f"L{layer}"
                delta, base = by_name[name].get(key), by_name[BASE_NAME].get(key)
                if delta is None or base is None:
                    raise ValueError(f"corpus stats.json: split '{split}' has no layer {layer} for '{name}'")
                if not delta["count"]:
                    raise ValueError(f"corpus stats.json: split '{split}' has no tokens; extract a non-empty split")
                ratio = delta["mean_norm"] / base["mean_norm"] if base["mean_norm"] else None
                out[split][name][key] = {"mean_norm": delta["mean_norm"], "base_mean_norm": base["mean_norm"],
                                         "ratio": ratio, "count": delta["count"]}
    return out


TABLE12_ARMS = {"rms": "post_norm", "none": "pre_norm"}
"""`sae.normalize` -> the paper's name for that arm of Table 12 (coefficients after / before RMS normalisation)."""


def table12(sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The L1 sweep (`saes/sweep.json`): one row per coefficient with L0 and held-out errors, selection marked,
    and which arm it is (`post_norm`: the SAEs saw x / s; `pre_norm`: raw x)."""
    try:
        points = sweep["points"]
        selected = float(sweep["selected_l1"])
        arm = TABLE12_ARMS[sweep["normalize"]]
        rows = [{"l1": float(p["l1_coeff"]), "l0": float(p["l0"]), "fvu": float(p["fvu"]),
                 "heldout_rel_l2": p.get("heldout_rel_l2"), "heldout_fvu": p.get("heldout_fvu"),
                 "selected": math.isclose(float(p["l1_coeff"]), selected)} for p in points]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"saes/sweep.json: not an L1 sweep record ({type(e).__name__}: {e}); rerun the saes "
                         "stage") from e
    if not rows:
        raise ValueError("saes/sweep.json: no sweep points")
    return {"adapter": sweep.get("adapter"), "layer": sweep.get("layer"), "selected_l1": selected, "arm": arm,
            "rows": sorted(rows, key=lambda r: r["l1"])}
