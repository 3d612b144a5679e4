"""Splice evaluation: does the delta dictionary explain the adapter's behaviour? The `splice` section, the four
splices of one layer, and their statistics over response tokens with prompt-bootstrap intervals.

Each adapted model runs with its residual at layer L replaced (`lgeo_jax.lora.splice`) by

    base_only               h_base                                   the adapter's effect removed at L
    delta_sae               h_base + recon_delta(δ)                  the delta SAE (first seed) on δ
    dictionary_difference   h_base + recon(h_adapted) - recon(h_base)   the layer's reference dictionary
    random_sae              h_base + recon_random(δ)                 a random-init SAE of the delta SAE's shape
                                                                     and scale (the null)

and, over the target tokens of held-out prompts (the response tokens with `data.loss_on: response`),

    kl_<splice>                   mean KL(p_adapted || p_spliced) per token
    effect_recovered.<splice>     1 - sum KL_splice / sum KL_base_only   (1: the splice restores the adapted model,
                                  0: no better than removing the adapter's effect at L; negative: worse)
    ce.adapted / ce.base / ce.<splice>   mean cross-entropy of the target token

all ratios of per-prompt totals, so one prompt bootstrap (`lgeo_jax.stats.bootstrap`) gives every interval from
shared resamples. The verdict `effect_recovered.delta_sae.vs_random` is +1 when the paired difference
effect_recovered.delta_sae - effect_recovered.random_sae has its whole interval above 0, -1 below, 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lgeo_jax.analysis._layer import _nest, measure
from lgeo_jax.analysis._nulls import random_init_params
from lgeo_jax.analysis._prompt_tables import _div, named_bootstrap
from lgeo_jax.config import Section, at_least, field, greater, section
from lgeo_jax.lora import Splice, SpliceInput, SpliceTokens
from lgeo_jax.sae import SAE
from lgeo_jax.stats import COUNT, Interval, PromptSums, vs_null

SPLICES = ("base_only", "delta_sae", "dictionary_difference", "random_sae")
"""The splices of every (adapter, layer), in the order `splices_for` builds them; base_only is the reference."""
DIFFERENCE_KEY = "effect_recovered.delta_sae_minus_random_sae"


@section
class SpliceConfig(Section):
    """Splice evaluation (the `evaluate` stage) on the first `n_prompts` prompts of `analysis.eval_split`."""

    enabled: bool = field(False)
    n_prompts: int = field(256, check=greater(0))  # held-out prompts (fewer when the split has fewer)
    batch_size: int = field(8, check=greater(0), affects_results=False)  # prompts per jitted call
    random_seed: int = field(0, check=at_least(0))  # the random-init SAE's draw (`random_init_params`)


def splices_for(delta: Sequence[SAE], dictionary: SAE, *, random_seed: int) -> list[Splice]:
    """The four splices of one layer (`SPLICES`): `delta` holds every adapter's delta SAE in stack order; the
    random-init SAE has the first delta SAE's configuration and each adapter's own scale."""
    params = random_init_params(delta[0].cfg, seed=random_seed)
    random = [SAE(delta[0].cfg, params, sae.scale) for sae in delta]
    return [Splice("base_only"), Splice("delta_sae", list(delta)),
            Splice("dictionary_difference", dictionary, on=SpliceInput.DIFFERENCE), Splice("random_sae", random)]


def splice_sums(tokens: SpliceTokens, sample_index: np.ndarray, adapters: Sequence[str],
                into: Mapping[str, PromptSums] | None = None) -> dict[str, PromptSums]:
    """Adds one batch's target tokens to per-adapter prompt sums (`kl.<splice>`, `ce.<splice>`, `ce.adapted`,
    `ce.base`); `sample_index` [B] is each batch row's prompt (rows of -1, fillers, carry no targets)."""
    if tokens.names != SPLICES:
        raise ValueError(f"splice_sums: splices {tokens.names} are not {SPLICES} (build them with `splices_for`)")
    if len(adapters) != tokens.kl.shape[1]:
        raise ValueError(f"splice_sums: {len(adapters)} adapter names for {tokens.kl.shape[1]} adapters")
    prompts = np.asarray(sample_index)[tokens.row]  # [N]
    if np.any(prompts < 0):
        raise ValueError("splice_sums: target tokens in filler rows (sample_index -1); their loss_mask must be 0")
    out = dict(into or {name: PromptSums() for name in adapters})
    for i, name in enumerate(adapters):
        quantities = {f"kl.{s}": tokens.kl[v, i] for v, s in enumerate(SPLICES)}
        quantities |= {f"ce.{s}": tokens.nll[v, i] for v, s in enumerate(SPLICES)}
        quantities |= {"ce.adapted": tokens.nll_adapted[i], "ce.base": tokens.nll_base}
        out[name].add(prompts, quantities)
    return out


def splice_metrics(t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every splice metric from totals (any leading resample axis; module docstring)."""
    n, base = t[COUNT], t["kl.base_only"]
    out = {f"kl_{s}": t[f"kl.{s}"] / n for s in SPLICES}
    out |= {f"effect_recovered.{s}": 1.0 - _div(t[f"kl.{s}"], base) for s in SPLICES[1:]}
    out[DIFFERENCE_KEY] = _div(t["kl.random_sae"] - t["kl.delta_sae"], base)
    out |= {f"ce.{s}": t[f"ce.{s}"] / n for s in ("adapted", "base", *SPLICES)}
    return out


def splice_record(sums: PromptSums, *, n_boot: int, seed: int, level: float) -> dict:
    """One (adapter, layer)'s splice numbers as `{"value", "ci_low", "ci_high"}` (nested by their dotted names),
    the delta-vs-random verdict, and the prompt and token counts."""
    intervals: dict[str, Interval] = named_bootstrap(sums, splice_metrics, n_boot=n_boot, seed=seed, level=level)
    record = _nest({name: measure(interval) for name, interval in intervals.items()})
    record["effect_recovered"]["delta_sae"]["vs_random"] = vs_null(intervals[DIFFERENCE_KEY], Interval.exact(0.0))
    return record | {"n_prompts": sums.n_prompts, "n_tokens": int(sums.sums[COUNT].sum())}
