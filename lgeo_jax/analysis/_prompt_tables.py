"""Tables 4-8 (and the base rows) as statistics of per-prompt totals, with prompt-bootstrap intervals.

Each function maps totals (name -> array, any leading resample axis; see `lgeo_jax.stats.bootstrap`) to
named metrics, so the point value and every resample come from one formula and all metrics of one
(adapter, layer) share their resamples: Table 7's ratio and the Table 5-6 errors it is built from are paired.

    rel_l2        = sum_t ratio_t / #(||x_t|| > 0)        (mean of per-token ratios, docs/conventions.md)
    rel_l2_pooled = sqrt(sum err / sum ||x||^2)
    fvu           = sum err / sum ||x - mean||^2,  sum ||x - mean||^2 = sum ||x - c||^2 - ||sum (x - c)||^2 / n
                    with c the full split's mean (so the correction is small and never cancels badly)
    improvement   = 100 (1 - E_sae / E_reference)   per error definition (Table 7)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lgeo_jax.analysis._tokens import RECONS, T8_VARIANTS, AdapterSums
from lgeo_jax.stats import COUNT, Interval, PromptSums, bootstrap

ERROR_NAMES = ("rel_l2", "rel_l2_pooled", "fvu")
Totals = Mapping[str, np.ndarray]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def _centred(t: Totals, vector: str, squares: str) -> np.ndarray:
    """sum ||x - mean||^2 of the (resampled) tokens from sums of x - c and ||x - c||^2."""
    return t[squares] - np.sum(t[vector] ** 2, axis=-1) / t[COUNT]


def _errors(t: Totals, name: str, norm_sq: np.ndarray, centred: np.ndarray) -> dict[str, np.ndarray]:
    return {"rel_l2": _div(t[f"{name}.ratio"], t["nz"]), "rel_l2_pooled": np.sqrt(_div(t[f"{name}.err"], norm_sq)),
            "fvu": _div(t[f"{name}.err"], centred)}


def improvement(sae: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Table 7: 100 (1 - E_sae / E_reference) per error definition (NaN where E_reference is 0)."""
    return {e: 100.0 * (1.0 - _div(sae[e], reference[e])) for e in ERROR_NAMES}


def adapter_metrics(t: Totals, seeds: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every Table 4-8 and 11 (variance ratio) metric of one adapter, keyed `<table>.<path>`."""
    n = t[COUNT]
    centred = _centred(t, "d_c", "mean_delta.err")  # ||delta - mean||^2 summed: mean_delta's err is ||delta - c||^2
    out = {"table4.mean_norm": t["d_norm"] / n, "table4.base_mean_norm": t["b_norm"] / n,
           "table4.ratio": _div(t["d_norm"], t["b_norm"]),
           "table11.variance_ratio": _div(centred, _centred(t, "b_c", "b_c_sq"))}
    recon = {name: _errors(t, name, t["d_sq"], centred) for name in RECONS}
    sae = {s: _errors(t, f"sae{s}", t["d_sq"], centred) for s in seeds}
    for name, errors in recon.items():
        out |= {f"table5.{name}.{e}": v for e, v in errors.items()}
        out |= {f"table7.{name}.{e}": v for e, v in improvement(sae[seeds[0]], errors).items()}
    for s, errors in sae.items():
        out |= {f"table6.{s}.{e}": v for e, v in errors.items()}
        out[f"table6.{s}.l0"] = t[f"sae{s}.l0"] / n
    for v in T8_VARIANTS:
        g = {k: t[f"t8.{v}.{k}"] for k in ("active", "ratio", "shared", "n_delta", "n_base", "chance",
                                          "chance_pooled", "s_active", "s_ratio", "s_shared", "s_n_delta")}
        out |= {f"table8.{v}.overlap": _div(g["ratio"], g["active"]),
                f"table8.{v}.overlap_pooled": _div(g["shared"], g["n_delta"]),
                f"table8.{v}.null_chance": _div(g["chance"], g["active"]),
                f"table8.{v}.null_chance_pooled": _div(g["chance_pooled"], g["n_delta"]),
                f"table8.{v}.null_shuffled": _div(g["s_ratio"], g["s_active"]),
                f"table8.{v}.null_shuffled_pooled": _div(g["s_shared"], g["s_n_delta"]),
                f"table8.{v}.active_delta": g["n_delta"] / n, f"table8.{v}.active_base": g["n_base"] / n,
                f"table8.{v}.tokens_with_active": g["active"] / n}
    out["table8.zero_share"] = _div(t["t8.all.n_delta"] - t["t8.nonzero.n_delta"], t["t8.all.n_delta"])
    return out


def base_metrics(t: Totals, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each SAE's reconstruction of h_base (`base_pass`): errors and L0, keyed `<name>.<metric>`."""
    centred = _centred(t, "x_c", "x_c_sq")
    out = {}
    for name in names:
        out |= {f"{name}.{e}": v for e, v in _errors(t, name, t["x_sq"], centred).items()}
        out[f"{name}.l0"] = t[f"{name}.l0"] / t[COUNT]
    return out


def named_bootstrap(sums: PromptSums, metrics: Callable[[Totals], Mapping[str, np.ndarray]], *, n_boot: int,
                    seed: int, level: float) -> dict[str, Interval]:
    """One prompt bootstrap of many named metrics at once: `{name: Interval}` (shared resamples)."""
    names = list(metrics(sums.totals()))

    def stacked(t: Totals) -> np.ndarray:
        values = metrics(t)
        return np.stack([np.asarray(values[k], np.float64) for k in names], axis=-1)  # [..., K]

    with np.errstate(invalid="ignore", divide="ignore"):
        interval = bootstrap(sums.sums, stacked, n_boot=n_boot, seed=seed, level=level)
    return {name: interval[..., i] for i, name in enumerate(names)}


def adapter_intervals(result: AdapterSums, *, n_boot: int, seed: int, level: float) -> dict[str, Interval]:
    return named_bootstrap(result.sums, lambda t: adapter_metrics(t, result.seeds), n_boot=n_boot, seed=seed,
                           level=level)
