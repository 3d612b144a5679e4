"""Everything the study reports for one layer, each number with its interval and its nulls: the token pass
(Tables 4-8, 11, prompt bootstrap) and the dictionary geometry (Tables 9-10 and the k sweep, latent
bootstrap over every seed), as a JSON-ready record plus the raw arrays the plots and the cross-layer
density trend need.

A reported number is `{"value", "ci_low", "ci_high"}` (`measure`); a headline number of Tables 9-11
adds `"vs_null"`: +1 / -1 / 0 when its interval lies above / below / overlaps its null's
(`lgeo_jax.stats.vs_null`). Nulls, each computed exactly like the number (docs/conventions.md):
  random_directions / random_subspaces  Monte Carlo over `null_samples` draws of the same shapes
  random_init                           `null_samples` freshly initialised decoders against the dictionary:
                                        the null of the verdicts (it keeps the dictionary's anisotropy)
  seed_to_seed                          every ordered pair of seeds: an agreement *ceiling*, not a null
  base_vs_dictionary                    SAEs trained on h_base against the dictionary (base-base)
  Table 8 shuffled / Table 11 null      delta of a random other token of the whole split (one permutation)
Table 9 also carries the one-to-one numbers under their own names: `matched_cosine` (mean cosine of the Hungarian
matching of live delta rows to dictionary rows; latent bootstrap over matched pairs and seeds, the matching held
fixed) and `mutual_nearest` (the mutual-nearest fraction), each with `null` (random directions) and `random_init`.
With the adapters' write spans, each cell gains `lora_span` (`lgeo_jax.analysis._lora_span`).
Live latents are decided on the SAE's training split (`live_density`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping

import numpy as np

from lgeo_jax.analysis._cka import PromptCKA, PromptGrid
from lgeo_jax.analysis._config import AnalysisConfig
from lgeo_jax.analysis._dictionary import (
    ANGLE_STATS,
    ROW_STATS,
    compare,
    count_rows,
    live_rows,
    matched_cosine,
    row_stats,
    spectrum,
    subspace,
    subspace_k,
    subspace_resamples,
)
from lgeo_jax.analysis._lora_span import LoraSpan, span_record
from lgeo_jax.analysis._nulls import NullCache, expected_random_directions, subspace_limit
from lgeo_jax.analysis._prompt_tables import adapter_intervals, base_metrics, named_bootstrap
from lgeo_jax.analysis._tokens import T8_VARIANTS, DeviceSAE, FiringCounts, adapter_pass, base_pass
from lgeo_jax.sae import SAE
from lgeo_jax.stats import (
    COUNT,
    Interval,
    bias_corrected,
    bootstrap_groups,
    bootstrap_items,
    null_interval,
    vs_null,
)

CKA_PAIRS = {  # Table 11: label -> (x, y) arrays of `PromptCKA`
    "delta_base": ("delta", "h_base"),
    "base_adapted": ("h_base", "h_adapted"),
    "null_delta_base": ("partner", "h_base"),  # delta of random other tokens against h_base
    "null_base_adapted": ("h_base", "partner_adapted"),  # h_base against h_base + delta of random other tokens
}


@dataclasses.dataclass(frozen=True)
class LayerSAEs:
    """The SAEs of one layer: the reference dictionary, delta SAEs per adapter and seed (first seed first), and
    base SAEs usable for the base-base null (never the one serving as the dictionary itself)."""

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

    def training_arrays(self) -> dict[str, tuple[str, SAE]]:
        """`firing key -> (corpus array name, SAE)`: what each SAE was trained on, for its live latents."""
        out = {firing_key(a, s): (a, sae) for a, by_seed in self.delta.items() for s, sae in by_seed.items()}
        return out | {firing_key(None, s): (None, sae) for s, sae in self.base.items()}


def firing_key(adapter: str | None, seed: int) -> str:
    """Key of an SAE's training-split firing counts: `<adapter>/s<seed>`, `base/s<seed>` for base SAEs."""
    return f"{adapter or 'base'}/s{seed}"


def _finite(x) -> float | None:
    """A JSON number: None where undefined (JSON has no NaN)."""
    x = float(x)
    return x if np.isfinite(x) else None


def measure(interval: Interval) -> dict[str, float | None]:
    """`{"value", "ci_low", "ci_high"}` of a scalar interval (None where undefined)."""
    return {"value": _finite(interval.point), "ci_low": _finite(interval.low), "ci_high": _finite(interval.high)}


def measure_cka(interval: Interval) -> dict[str, float | None]:
    """`measure` plus `bias_corrected`, the centre of CKA's basic interval (`lgeo_jax.analysis._cka`), clipped like
    its bounds to CKA's range [0, 1]."""
    centre = np.clip(bias_corrected(interval.point, interval.samples), 0.0, 1.0)
    return {**measure(interval), "bias_corrected": _finite(centre)}


def _with_verdict(estimate: Interval, null: Interval, *, shown: Callable[[Interval], dict] = measure,
                  **extra: Interval) -> dict:
    out = {**shown(estimate), "vs_null": vs_null(estimate, null)}
    return out | {f"vs_{name}": vs_null(estimate, other) for name, other in extra.items()}


def _nest(flat: Mapping[str, object]) -> dict:
    """`{"a.b.c": v}` -> `{"a": {"b": {"c": v}}}`."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _nulls_of(stats: np.ndarray, names: tuple[str, ...], level: float) -> dict[str, Interval]:
    null = null_interval(stats, level=level)  # [len(names)]
    return {name: null[i] for i, name in enumerate(names)}


class _Geometry:
    """Tables 9-10 of one layer: the dictionary side is computed once, each adapter against it."""

    def __init__(self, layer: int, d_model: int, saes: LayerSAEs, firing: Mapping[str, FiringCounts],
                 config: AnalysisConfig, nulls: NullCache):
        self.layer, self.d, self.config, self.nulls = layer, d_model, config, nulls
        self.dict_rows = live_rows(saes.dictionary.params["W_dec"])  # every dictionary row (zero rows take no part)
        self.n_dict = count_rows(self.dict_rows)
        self.base_rows = {s: live_rows(sae.params["W_dec"], firing[firing_key(None, s)].live(config.live_density))
                          for s, sae in saes.base.items()}
        self.base_rows = {s: r for s, r in self.base_rows.items() if count_rows(r)}
        self._bases: dict[int, np.ndarray] = {}
        self._base_cmp: dict[int, list] = {}
        self.dict_spectrum = spectrum(self.dict_rows)

    def basis(self, k: int) -> np.ndarray:
        if k not in self._bases:
            self._bases[k] = subspace(self.dict_rows, k)
        return self._bases[k]

    def ks(self, rows: Mapping[int, np.ndarray]) -> tuple[int, list[int]]:
        """Table 10's k for this adapter (capped by every size involved) and the k sweep under the same cap."""
        counts = [self.d, self.n_dict, *(count_rows(r) for r in rows.values()),
                  *(count_rows(r) for r in self.base_rows.values())]
        k = subspace_k(self.config.subspace_k, *counts)
        cap = min(counts)
        return k, sorted({k, *(min(x, cap) for x in self.config.k_sweep)})

    def _matched(self, rows: Mapping[int, np.ndarray], m: Mapping[int, int], widths: Mapping[int, int]) -> dict:
        """One-to-one: each dictionary row serves one delta row at most (Hungarian), beside random-init and
        random-direction nulls; latent bootstrap over matched pairs and seeds, the matching held fixed."""
        c, seeds = self.config, list(rows)
        matched = {s: bootstrap_items(matched_cosine(rows[s], self.dict_rows, c.max_cosine_chunk), n_boot=c.n_boot,
                                      seed=c.boot_seed, level=c.confidence, keep_samples=True) for s in seeds}
        estimate = bootstrap_groups(np.stack([matched[s].point for s in seeds]),
                                    np.stack([matched[s].samples for s in seeds]), seed=c.boot_seed,
                                    level=c.confidence)
        init = null_interval(np.mean([self.nulls.random_init_matching(f"L{self.layer}", widths[s], m[s],
                                                                      self.dict_rows) for s in seeds], axis=0),
                             level=c.confidence)
        random = null_interval(np.mean([self.nulls.random_matching(m[s], self.n_dict, self.d) for s in seeds],
                                       axis=0), level=c.confidence)
        return {**_with_verdict(estimate, init, random=random), "null": measure(random), "random_init": measure(init)}

    def adapter(self, rows: Mapping[int, np.ndarray], widths: Mapping[int, int]) -> tuple[dict, dict, dict, dict]:
        """Table 9, Table 10, the k sweep and the plots' arrays of one adapter from its seeds' live decoder rows."""
        c = self.config
        k_head, ks = self.ks(rows)
        basis = self.basis(max(ks))
        seeds = list(rows)
        near, aligned = c.near_orthogonal_deg, c.aligned_deg
        comparisons = {s: compare(rows[s], self.dict_rows, ks, chunk=c.max_cosine_chunk, b_basis=basis) for s in seeds}
        item = {s: bootstrap_items(comparisons[s].rows, row_stats, n_boot=c.n_boot, seed=c.boot_seed,
                                   level=c.confidence, keep_samples=True) for s in seeds}
        estimate_rows = bootstrap_groups(np.stack([item[s].point for s in seeds]),
                                         np.stack([item[s].samples for s in seeds]), seed=c.boot_seed,
                                         level=c.confidence)
        resampled = {s: subspace_resamples(rows[s], basis, ks, n_boot=c.subspace_boot, seed=c.boot_seed,
                                           near_orthogonal=near, aligned=aligned) for s in seeds}
        angle_points = {s: comparisons[s].angle_summary(near, aligned) for s in seeds}
        estimate_angles = {k: bootstrap_groups(np.stack([angle_points[s][k] for s in seeds]),
                                               np.stack([resampled[s][k] for s in seeds]), seed=c.boot_seed,
                                               level=c.confidence) for k in ks}
        # nulls: for each draw, the mean over seeds of the null statistic at each seed's live count
        m = {s: count_rows(rows[s]) for s in seeds}
        init = {s: self.nulls.random_init(f"L{self.layer}", widths[s], m[s], self.dict_rows, basis, ks) for s in seeds}
        direction = {s: self.nulls.random_directions(m[s], widths[s], self.n_dict, self.d) for s in seeds}
        init_rows = _nulls_of(np.mean([init[s][0].stats for s in seeds], axis=0), ROW_STATS, c.confidence)
        random_rows = _nulls_of(np.mean([direction[s].stats for s in seeds], axis=0), ROW_STATS, c.confidence)
        init_angles = {k: _nulls_of(np.mean([init[s][1][k] for s in seeds], axis=0), ANGLE_STATS, c.confidence)
                       for k in ks}
        random_angles = {k: _nulls_of(self.nulls.random_subspaces(k, self.d)[0], ANGLE_STATS, c.confidence)
                         for k in ks}
        exact = [expected_random_directions(m[s], self.n_dict, self.d) for s in seeds]
        mnn = ROW_STATS.index("mnn")

        t9 = {"seeds": seeds, "width": {str(s): widths[s] for s in seeds}, "live": {str(s): m[s] for s in seeds},
              "dead_fraction": {str(s): 1.0 - m[s] / widths[s] for s in seeds}, "dictionary_rows": self.n_dict,
              "delta_vs_dictionary": {name: _with_verdict(estimate_rows[i], init_rows[name],
                                                          random=random_rows[name])
                                      for i, name in enumerate(ROW_STATS)},
              "random_init": {name: measure(v) for name, v in init_rows.items()},
              "random_directions": {**{name: measure(v) for name, v in random_rows.items()},
                                    "expected": {k: float(np.mean([e[k] for e in exact])) for k in exact[0]}},
              "mutual_nearest": {**_with_verdict(estimate_rows[mnn], init_rows["mnn"], random=random_rows["mnn"]),
                                 "null": measure(random_rows["mnn"]), "random_init": measure(init_rows["mnn"]),
                                 "expected": float(np.mean([e["mnn"] for e in exact]))}}
        if c.matching:
            t9["matched_cosine"] = self._matched(rows, m, widths)
        pairs = self._pairs(rows, k_head, basis)
        t9 |= {name: {**{n: measure(g[i]) for i, n in enumerate(ROW_STATS)}, **info}
               for name, (g, _, info) in pairs.items()}
        t10 = {"k": k_head, "delta_vs_dictionary": {name: _with_verdict(estimate_angles[k_head][i],
                                                                        init_angles[k_head][name],
                                                                        random=random_angles[k_head][name])
                                                    for i, name in enumerate(ANGLE_STATS)},
               "random_init": {name: measure(v) for name, v in init_angles[k_head].items()},
               "random_subspaces": {**{name: measure(v) for name, v in random_angles[k_head].items()},
                                    "limit": subspace_limit(k_head, self.d, near, aligned)}}
        for name, (_, group, info) in pairs.items():  # points: the mean over pairs / base seeds
            stats = np.mean([cmp.angle_summary(near, aligned)[k_head] for cmp in group], axis=0)
            t10[name] = {**{n: {"value": float(stats[i])} for i, n in enumerate(ANGLE_STATS)}, **info}
        primary_spectrum = spectrum(rows[seeds[0]])
        sweep = {str(k): {"delta_vs_dictionary": {name: _with_verdict(estimate_angles[k][i], init_angles[k][name],
                                                                      random=random_angles[k][name])
                                                  for i, name in enumerate(ANGLE_STATS)},
                          "random_subspaces": {"mean": measure(random_angles[k]["mean"])},
                          "random_init": {"mean": measure(init_angles[k]["mean"])},
                          "energy": float(primary_spectrum[:k].sum()),
                          "dictionary_energy": float(self.dict_spectrum[:k].sum())}
                 for k in ks}
        t10["energy_top_k"] = sweep[str(k_head)]["energy"]
        t10["dictionary_energy_top_k"] = sweep[str(k_head)]["dictionary_energy"]
        arrays = {"delta_vs_dictionary/max_cos": comparisons[seeds[0]].rows[:, 0],
                  "delta_vs_dictionary/angles": comparisons[seeds[0]].angles[k_head],
                  "random_init/max_cos": init[seeds[0]][0].first_rows[:, 0],
                  "random_init/angles": init[seeds[0]][2][k_head],
                  "random_directions/max_cos": direction[seeds[0]].first_rows[:, 0],
                  "random_directions/angles": self.nulls.random_subspaces(k_head, self.d)[1],
                  "spectrum": primary_spectrum[:2 * max(ks)], "dictionary_spectrum": self.dict_spectrum[:2 * max(ks)]}
        for name, (_, group, _) in pairs.items():
            arrays |= {f"{name}/max_cos": group[0].rows[:, 0], f"{name}/angles": group[0].angles[k_head]}
        return t9, t10, {"ks": ks, "k": k_head, "cells": sweep}, arrays

    def _pairs(self, rows: Mapping[int, np.ndarray], k: int, basis: np.ndarray) -> dict[str, tuple]:
        """seed_to_seed (every ordered pair of seeds: the agreement ceiling) and base_vs_dictionary (every usable
        base SAE): `{name: (Table 9 group interval, [Comparison], info)}`."""
        c = self.config
        groups = {}
        seed_pairs = list(itertools.permutations(rows, 2))
        if seed_pairs:
            groups["seed_to_seed"] = ([compare(rows[i], rows[j], [k], chunk=c.max_cosine_chunk)
                                       for i, j in seed_pairs], {"pairs": len(seed_pairs)})
        if self.base_rows:
            if k not in self._base_cmp:  # independent of the adapter: once per layer and k
                self._base_cmp[k] = [compare(r, self.dict_rows, [k], chunk=c.max_cosine_chunk, b_basis=basis[:k])
                                     for r in self.base_rows.values()]
            groups["base_vs_dictionary"] = (self._base_cmp[k], {"base_seeds": list(self.base_rows)})
        out = {}
        for name, (group, info) in groups.items():
            items = [bootstrap_items(cmp.rows, row_stats, n_boot=c.n_boot, seed=c.boot_seed, keep_samples=True)
                     for cmp in group]
            g = bootstrap_groups(np.stack([i.point for i in items]), np.stack([i.samples for i in items]),
                                 seed=c.boot_seed, level=c.confidence)
            out[name] = (g, group, info)
        return out


def analyze_layer(layer: int, saes: LayerSAEs, h_base: np.ndarray, sample_index: np.ndarray,
                  delta_of: Callable[[str], np.ndarray], firing: Mapping[str, FiringCounts], config: AnalysisConfig,
                  nulls: NullCache, *, spans: Mapping[str, LoraSpan] | None = None,
                  on_tokens: Callable[[int], None] = lambda n: None,
                  on_phase: Callable[[str], None] = lambda text: None) -> tuple[dict, dict]:
    """One layer's record `{"base": ..., "dictionary": ..., "adapters": {name: {table4..table11, ...}}}` and raw
    arrays keyed `"<adapter>/<comparison>/<what>"` (plus per-prompt L0 sums for the density trend).

    `h_base` [T, D] and `delta_of(adapter)` [T, D] are the evaluation split's rows, `sample_index` [T] their
    prompts; `firing` holds every SAE's firing counts on its training split (`firing_key`). With `spans` (adapter
    -> its write span by this layer, `lora_span`) each adapter's cell gains the `lora_span` record. Progress:
    `on_tokens(n)` after each batch of the token passes, `on_phase(text)` when a part begins (for a progress bar).
    """
    d_model = h_base.shape[1]
    saes.check(layer, d_model)
    c = config
    boot = {"n_boot": c.n_boot, "seed": c.boot_seed, "level": c.confidence}
    grid = PromptGrid.from_sample_index(sample_index)
    if grid.n_prompts < 2:
        raise ValueError(f"layer {layer}: the evaluation split has {grid.n_prompts} prompt(s); the prompt bootstrap "
                         "needs at least 2 (widen the split)")
    # one permutation of the whole split pairs each token with a random other token for the shuffled nulls
    partner = np.random.default_rng([c.null_seed, layer]).permutation(sample_index.size)
    dictionary = DeviceSAE(saes.dictionary)
    base_devices = {f"base_s{s}": DeviceSAE(sae) for s, sae in saes.base.items()}
    base_sums = base_pass(h_base, sample_index, {"dictionary": dictionary, **base_devices})
    base_iv = named_bootstrap(base_sums, lambda t: base_metrics(t, ("dictionary", *base_devices)), **boot)
    zero_hat, zero_on = dictionary.zero_input(c.active_threshold)
    headline = "difference" if dictionary.has_decoder_bias else "direct"
    record: dict = {
        "prompts": grid.n_prompts, "tokens": int(sample_index.size),
        "dictionary": {"width": dictionary.width, "has_decoder_bias": dictionary.has_decoder_bias,
                       "zero_input_norm": float(np.linalg.norm(zero_hat)), "zero_input_latents": int(zero_on.sum()),
                       "headline_recon": headline},
        "base": _nest({k: measure(v) for k, v in base_iv.items()}),
        "adapters": {},
    }
    geometry = _Geometry(layer, d_model, saes, firing, c, nulls)
    arrays: dict[str, np.ndarray] = {"prompt_ids": grid.ids.astype(np.int64)}
    for adapter, by_seed in saes.delta.items():
        seeds = tuple(by_seed)
        on_phase(f"{adapter}: token pass")
        delta = np.asarray(delta_of(adapter), np.float32)
        sums = adapter_pass(h_base, delta, sample_index, partner, dictionary,
                            {s: DeviceSAE(sae) for s, sae in by_seed.items()}, active_threshold=c.active_threshold,
                            on_batch=on_tokens)
        on_phase(f"{adapter}: bootstrap and CKA")
        iv = adapter_intervals(sums, **boot)
        prompt_cka = PromptCKA(grid, {"h_base": h_base, "delta": delta, "h_adapted": h_base + delta,
                                      "partner": delta[partner], "partner_adapted": h_base + delta[partner]})
        cka = prompt_cka.intervals(CKA_PAIRS, **boot)
        cell = _nest({k: measure(v) for k, v in iv.items()})
        cell["table5"]["headline"] = cell["table7"]["headline"] = headline
        t11 = cell.setdefault("table11", {})
        t11["delta_base"] = _with_verdict(cka["delta_base"], cka["null_delta_base"], shown=measure_cka)
        t11["base_adapted"] = _with_verdict(cka["base_adapted"], cka["null_base_adapted"], shown=measure_cka)
        t11["null_delta_base"] = measure_cka(cka["null_delta_base"])
        t11["null_base_adapted"] = measure_cka(cka["null_base_adapted"])
        for v in T8_VARIANTS:  # Table 8's verdict: the overlap against its shuffled-token null
            verdict = vs_null(iv[f"table8.{v}.overlap"], iv[f"table8.{v}.null_shuffled"])
            cell["table8"][v]["overlap"]["vs_null"] = verdict
        cell["table8"]["zero_latents"] = sums.zero_latents
        cell["table8"]["tokens"] = int(sample_index.size)
        live = {s: firing[firing_key(adapter, s)].live(c.live_density) for s in seeds}
        for s in seeds:
            if not live[s].any():
                raise ValueError(f"layer {layer}: delta SAE {adapter} seed {s} has no live latent on its training "
                                 f"split (density > {c.live_density:g}); its geometry is undefined (train it longer "
                                 "or lower sae.l1)")
        rows = {s: live_rows(by_seed[s].params["W_dec"], live[s]) for s in seeds}
        widths = {s: by_seed[s].cfg.d_sae for s in seeds}
        on_phase(f"{adapter}: geometry and nulls")
        cell["table9"], cell["table10"], cell["table10_k"], geo_arrays = geometry.adapter(rows, widths)
        for s in seeds:
            train = firing[firing_key(adapter, s)].result(c.live_density)
            cell["table6"][str(s)]["train"] = {**train, "density": train["l0"] / widths[s]}
        cell["table9"]["live_rule"] = (f"fires on > {c.live_density:g} of its training tokens "
                                       f"({firing[firing_key(adapter, seeds[0])].n} tokens)")
        if spans is not None:
            on_phase(f"{adapter}: LoRA span")
            cell["lora_span"] = span_record(spans[adapter], delta, sample_index, prompt_cka, "delta", rows, c, nulls)
        record["adapters"][adapter] = cell
        arrays |= {f"{adapter}/{k}": v for k, v in geo_arrays.items()}
        arrays[f"{adapter}/prompt_l0"] = sums.sums.sums[f"sae{seeds[0]}.l0"]
        arrays["prompt_tokens"] = sums.sums.sums[COUNT]
    return record, arrays
