"""Everything the study reports for one layer: token passes (Tables 5-8, 11) and dictionary geometry with
its nulls (Tables 9-10), for every adapter, as a JSON-ready record plus the raw arrays the plots need.

The reference dictionary is Gemma Scope, any SAE directory the config names, or (builtin runs) our base SAE.
Each geometric number comes with (docs/conventions.md, "Statistics"):
  random_directions  Monte Carlo random rows / subspaces of the same shapes (+ exact / large-d values)
  random_init        a freshly initialised SAE decoder against the real dictionary
  seed_to_seed       the delta SAE against the same data's SAE with another seed (the ceiling)
  base_vs_dictionary an SAE trained on h_base against the dictionary (base-base)
All comparisons of one (adapter, layer) use the same k, so the nulls are computed exactly like the number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from lgeo_jax.analysis._config import AnalysisConfig
from lgeo_jax.analysis._dictionary import Comparison, compare, count_rows, live_rows, subspace, subspace_k
from lgeo_jax.analysis._nulls import (
    random_angles,
    random_angles_summary,
    random_init_decoder,
    random_max_cosine,
    random_max_cosine_summary,
)
from lgeo_jax.analysis._recon import improvement
from lgeo_jax.analysis._tokens import DeviceSAE, adapter_pass, base_pass
from lgeo_jax.sae import SAE


@dataclasses.dataclass(frozen=True)
class LayerSAEs:
    """The SAEs of one layer: the reference dictionary, delta SAEs per adapter and seed (first seed is the
    one reported; a second one gives the seed-to-seed null), and base SAEs usable for the base-base null
    (never the one serving as the dictionary itself)."""

    dictionary: SAE
    delta: Mapping[str, Mapping[int, SAE]]
    base: Mapping[int, SAE] = dataclasses.field(default_factory=dict)

    def check(self, layer: int, d_model: int) -> None:
        """Every SAE must read d_model-wide activations; named errors otherwise."""
        found = [("dictionary (Gemma Scope)", self.dictionary)]
        found += [(f"delta SAE {a} seed {s}", sae) for a, by_seed in self.delta.items() for s, sae in by_seed.items()]
        found += [(f"base SAE seed {s}", sae) for s, sae in self.base.items()]
        for what, sae in found:
            if sae.cfg.d_in != d_model:
                raise ValueError(f"layer {layer}: {what} has d_in={sae.cfg.d_in}, but the corpus has d_model="
                                 f"{d_model}; use SAEs for this model and layer")
        for a, by_seed in self.delta.items():
            if not by_seed:
                raise ValueError(f"layer {layer}: no delta SAE for adapter '{a}'; run the saes stage")


class NullCache:
    """Shape-only nulls (random directions / subspaces) with their summaries, computed once per shape."""

    def __init__(self, config: AnalysisConfig):
        self.config = config
        self._max_cos: dict[tuple, tuple[dict, dict]] = {}
        self._angles: dict[tuple, tuple[np.ndarray, dict]] = {}

    def max_cosine(self, m: int, width: int, n: int, d: int) -> tuple[dict[str, np.ndarray], dict]:
        """m random directions (the first m of `width` i.i.d. draws, so one draw serves every live count)
        against n random directions: raw arrays and their summary."""
        if (width, n, d) not in self._max_cos:
            draw = random_max_cosine(width, n, d, seed=self.config.null_seed, chunk=self.config.max_cosine_chunk)
            self._max_cos[(width, n, d)] = (draw, random_max_cosine_summary(draw, n, d))
        draw, summary = self._max_cos[(width, n, d)]
        if m == width:
            return draw, summary
        draw = {key: values[:m] for key, values in draw.items()}
        return draw, random_max_cosine_summary(draw, n, d)

    def angles(self, k: int, d: int) -> tuple[np.ndarray, dict]:
        """Principal angles [null_samples, k] of random subspace pairs and their summary."""
        if (k, d) not in self._angles:
            s = self.config
            angles = random_angles(k, d, n_trials=s.null_samples, seed=s.null_seed)
            self._angles[(k, d)] = (angles, random_angles_summary(angles, d, s.near_orthogonal_deg, s.aligned_deg))
        return self._angles[(k, d)]


def _nonfinite_to_none(value):
    """JSON has no NaN: undefined numbers (e.g. CKA of an all-zero delta) become null."""
    if isinstance(value, dict):
        return {k: _nonfinite_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def analyze_layer(layer: int, d_model: int, saes: LayerSAEs, base_batches: Callable[[], Iterable[np.ndarray]],
                  pair_batches: Callable[[str], Iterable[tuple[np.ndarray, np.ndarray]]],
                  config: AnalysisConfig, nulls: NullCache) -> tuple[dict, dict[str, np.ndarray]]:
    """One layer's record `{"base": ..., "adapters": {name: {table5..table11}}}` and raw arrays keyed
    `"<adapter>/<comparison>/<max_cos|max_cos_abs|angles>"`.

    `base_batches()` yields h_base batches [B, D] and `pair_batches(adapter)` yields (h_base, delta)
    batches of the same tokens, both over the evaluation split.
    """
    saes.check(layer, d_model)
    dictionary = DeviceSAE(saes.dictionary)
    base_devices = {s: DeviceSAE(sae) for s, sae in saes.base.items()}
    base = base_pass(base_batches(), dictionary, base_devices)
    dict_rows = live_rows(saes.dictionary.params["W_dec"])  # [N, D] every dictionary row (zero rows take no part)
    n_dict = count_rows(dict_rows)
    base_rows = {s: live_rows(sae.params["W_dec"], base.base_firing[s].live) for s, sae in saes.base.items()}
    dict_bases: dict[int, np.ndarray] = {}  # k -> the dictionary's basis, shared by the adapters
    base_comparisons: dict[tuple[int, int], Comparison] = {}  # (base seed, k) -> base SAE vs dictionary
    record: dict = {"base": base.summary(), "adapters": {}}
    arrays: dict[str, np.ndarray] = {}
    for adapter, by_seed in saes.delta.items():
        seeds = list(by_seed)
        result = adapter_pass(pair_batches(adapter), dictionary, {s: DeviceSAE(by_seed[s]) for s in seeds},
                              active_threshold=config.active_threshold)
        summary = result.summary()
        primary = seeds[0]
        summary["table7"] = improvement(summary["table6"][str(primary)], summary["table5"]["direct"])
        summary["table7_difference"] = improvement(summary["table6"][str(primary)], summary["table5"]["difference"])
        rows = {s: live_rows(by_seed[s].params["W_dec"], result.firing[s].live) for s in seeds}
        a = rows[primary]  # [F, D] dead latents zeroed
        n_live = count_rows(a)
        if n_live == 0:
            raise ValueError(f"layer {layer}: delta SAE {adapter} seed {primary} has no live latent on the evaluation "
                             "split; its geometry is undefined (train it longer or lower sae.l1)")
        others = {s: r for s, r in rows.items() if s != primary and count_rows(r)}
        usable_base = {s: r for s, r in base_rows.items() if count_rows(r)}
        counts = [d_model, n_live, n_dict, *(count_rows(r) for r in others.values()),
                  *(count_rows(r) for r in usable_base.values())]
        k = subspace_k(config.subspace_k, *counts)
        if k not in dict_bases:
            dict_bases[k] = subspace(dict_rows, k)
        dict_basis = dict_bases[k]
        chunk = config.max_cosine_chunk
        comparisons: dict[str, Comparison] = {
            "delta_vs_dictionary": compare(a, dict_rows, k, chunk=chunk, b_basis=dict_basis),
            "random_init": compare(live_rows(random_init_decoder(by_seed[primary].cfg.d_sae, d_model,
                                                                 seed=config.null_seed), result.firing[primary].live),
                                   dict_rows, k, chunk=chunk, b_basis=dict_basis),
        }
        if others:
            comparisons["seed_to_seed"] = compare(a, next(iter(others.values())), k, chunk=chunk)
        if usable_base:
            seed, rows_b = next(iter(usable_base.items()))
            if (seed, k) not in base_comparisons:  # independent of the adapter: once per layer and k
                base_comparisons[(seed, k)] = compare(rows_b, dict_rows, k, chunk=chunk, b_basis=dict_basis)
            comparisons["base_vs_dictionary"] = base_comparisons[(seed, k)]
        geometry = {name: c.summary(config.near_orthogonal_deg, config.aligned_deg)
                    for name, c in comparisons.items()}
        random_cos, random_cos_summary = nulls.max_cosine(n_live, len(a), n_dict, d_model)
        random_ang, random_ang_summary = nulls.angles(k, d_model)
        geometry["random_directions"] = {**random_cos_summary, "angles": random_ang_summary}
        firing = result.firing[primary].result()
        summary["table9"] = {
            "seed": primary, "width": by_seed[primary].cfg.d_sae, "live": firing["live"],
            "dead_fraction": firing["dead_fraction"], "dictionary_rows": n_dict,
            **{name: {"signed": g["max_cosine"], "abs": g["max_cosine_abs"]} for name, g in geometry.items()},
        }
        summary["table10"] = {"k": k, **{name: g["angles"] for name, g in geometry.items()}}
        if others:
            summary["table9"]["seed_to_seed"]["other_seed"] = next(iter(others))
        if usable_base:
            summary["table9"]["base_vs_dictionary"]["base_seed"] = next(iter(usable_base))
        record["adapters"][adapter] = _nonfinite_to_none(summary)
        for name, c in comparisons.items():
            arrays[f"{adapter}/{name}/max_cos"] = c.max_cos
            arrays[f"{adapter}/{name}/max_cos_abs"] = c.max_cos_abs
            arrays[f"{adapter}/{name}/angles"] = c.angles
        arrays[f"{adapter}/random_directions/max_cos"] = random_cos["max_cos"]
        arrays[f"{adapter}/random_directions/max_cos_abs"] = random_cos["max_cos_abs"]
        arrays[f"{adapter}/random_directions/angles"] = random_ang
    return _nonfinite_to_none(record), arrays
