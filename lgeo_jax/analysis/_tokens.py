"""Token passes over one layer's evaluation split: every per-token quantity behind Tables 4-8 (and the base
rows), summed per prompt (`lgeo_jax.stats.PromptSums`) so each number gets a prompt-bootstrap interval.

Per batch of tokens (h_base [B, D], the adapter's delta [B, D], and delta' [B, D] = the delta of a random
other token of the split, the same permutation for the whole split):
  dictionary on delta                          -> Table 5 "direct"
  dictionary(h_base + delta) - dictionary(h_base) -> Table 5 "difference" (the headline when b_dec != 0)
  the dictionary's reconstruction of 0         -> Table 5 "zero_input" (b_dec, plus latents that fire on 0)
  the evaluation split's mean delta            -> Table 5 "mean_delta" (the best constant predictor)
  every seed's delta SAE on delta              -> Table 6 (and the L0 of the density table)
  dictionary features on delta vs on h_base    -> Table 8, with and without latents that fire on a zero
                                                  input, and its shuffled null (delta' against h_base)
  ||delta||, ||h_base|| and centred sums       -> Table 4 and Table 11's variance ratio
Table 11's CKAs need all tokens at once (`lgeo_jax.analysis._cka`). SAE forwards are jitted float32 at
HIGHEST matmul precision (accelerators default to bf16 / TF32 passes); sums are float64 on the host.

Quantity names (the PromptSums keys) are `<what>.<sum>`: `<recon>.err` = ||delta - recon||^2,
`<recon>.ratio` = ||delta - recon|| / ||delta|| (0 where delta = 0, counted by `nz`), `t8.<variant>.<...>`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from lgeo_jax.sae import SAE, SAEConfig, forward
from lgeo_jax.stats import PromptSums

RECONS = ("direct", "difference", "zero_input", "mean_delta")
"""Table 5's reconstructions of delta by the dictionary and its two baselines (module docstring)."""
T8_VARIANTS = ("all", "nonzero")  # every dictionary latent / only latents that do not fire on a zero input


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params: dict, scale: jax.Array, x: jax.Array, cfg: SAEConfig) -> tuple[jax.Array, jax.Array]:
    with jax.default_matmul_precision("highest"):
        return forward(params, scale, x, cfg)  # [B, F], [B, D]


class DeviceSAE:
    """An SAE with its parameters on the device once, and a jitted float32 forward (HIGHEST precision) in
    original units."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self.params = {k: jnp.asarray(v, jnp.float32) for k, v in sae.params.items()}
        self.scale = jnp.float32(sae.scale)

    @property
    def width(self) -> int:
        return self.sae.cfg.d_sae

    @property
    def has_decoder_bias(self) -> bool:
        return bool(np.any(np.asarray(self.sae.params["b_dec"]) != 0))

    def __call__(self, x: Float[np.ndarray, "B D"]) -> tuple[np.ndarray, np.ndarray]:
        """Feature activations [B, F] and reconstruction [B, D] (float32 numpy, original units)."""
        f, x_hat = _forward(self.params, self.scale, jnp.asarray(x, jnp.float32), self.sae.cfg)
        return np.asarray(f), np.asarray(x_hat)

    def zero_input(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """The reconstruction of a zero input [D] and the mask [F] of latents active (> threshold) on it."""
        f, x_hat = self(np.zeros((1, self.sae.cfg.d_in), np.float32))
        return x_hat[0], f[0] > threshold


@dataclasses.dataclass
class FiringCounts:
    """How often each latent fires (f > 0) over the tokens seen; live = density above a threshold."""

    counts: np.ndarray
    n: int = 0

    @classmethod
    def zeros(cls, width: int) -> FiringCounts:
        return cls(np.zeros(width, np.int64))

    def add(self, f: np.ndarray) -> None:
        self.counts += (np.asarray(f) > 0).sum(axis=0)
        self.n += f.shape[0]

    def live(self, min_density: float) -> np.ndarray:
        """[F] latents firing on more than `min_density` of the tokens (and at least once)."""
        if self.n == 0:
            raise ValueError("FiringCounts.live: no tokens were seen")
        return (self.counts > 0) & (self.counts > min_density * self.n)

    def result(self, min_density: float) -> dict[str, float | int]:
        live = self.live(min_density)
        return {"l0": float(self.counts.sum() / self.n), "dead_fraction": float(np.mean(~live)),
                "live": int(live.sum()), "tokens": self.n}


def firing_counts(batches: Iterable[np.ndarray], saes: Mapping[str, DeviceSAE],
                  on_batch: Callable[[int], None] = lambda n: None) -> dict[str, FiringCounts]:
    """Per-latent firing counts of each SAE over `batches` [B, D] (the SAEs' training split)."""
    out = {name: FiringCounts.zeros(sae.width) for name, sae in saes.items()}
    for x in batches:
        for name, sae in saes.items():
            out[name].add(sae(x)[0])
        on_batch(x.shape[0])
    return out


def _t8_counts(on_x: jax.Array, on_b: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """|A_x|, |A_b|, |A_x & A_b| per token over the latents in `keep`."""
    on_x, on_b = on_x & keep, on_b & keep  # [B, F]
    return on_x.sum(axis=1), on_b.sum(axis=1), (on_x & on_b).sum(axis=1)  # [B] each


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dictionary_terms(params: dict, scale: jax.Array, h_base: jax.Array, delta: jax.Array, partner: jax.Array,
                      zero_hat: jax.Array, zero_on: jax.Array, mean_delta: jax.Array, threshold: jax.Array,
                      cfg: SAEConfig) -> dict[str, jax.Array]:
    """The dictionary's per-token numbers for Tables 5 and 8 on one batch (module docstring)."""
    fwd = functools.partial(_forward, params, scale, cfg=cfg)
    f_delta, delta_hat = fwd(delta)  # [B, F], [B, D]
    f_base, base_hat = fwd(h_base)
    _, adapted_hat = fwd(h_base + delta)  # h_adapted in float32
    f_partner, _ = fwd(partner)
    recon = {"direct": delta_hat, "difference": adapted_hat - base_hat, "zero_input": zero_hat[None],
             "mean_delta": mean_delta[None]}
    out = {f"{name}.err": jnp.sum((delta - r) ** 2, axis=1) for name, r in recon.items()}  # [B]
    on_delta, on_base, on_partner = f_delta > threshold, f_base > threshold, f_partner > threshold  # [B, F]
    for variant, keep in (("all", jnp.ones_like(zero_on)), ("nonzero", ~zero_on)):
        n_delta, n_base, shared = _t8_counts(on_delta, on_base, keep)
        n_partner, _, shared_partner = _t8_counts(on_partner, on_base, keep)
        out |= {f"t8.{variant}.n_delta": n_delta, f"t8.{variant}.n_base": n_base, f"t8.{variant}.shared": shared,
                f"t8.{variant}.n_partner": n_partner, f"t8.{variant}.shared_partner": shared_partner}
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sae_terms(params: dict, scale: jax.Array, delta: jax.Array, cfg: SAEConfig) -> tuple[jax.Array, jax.Array]:
    f, x_hat = _forward(params, scale, delta, cfg)
    return jnp.sum((delta - x_hat) ** 2, axis=1), jnp.sum(f > 0, axis=1)  # [B] err, [B] L0


def _ratio(err: np.ndarray, norm_sq: np.ndarray) -> np.ndarray:
    """||x - x_hat|| / ||x|| per token, 0 where x = 0 (those tokens are left out via the `nz` count)."""
    return np.where(norm_sq > 0, np.sqrt(err / np.where(norm_sq > 0, norm_sq, 1.0)), 0.0)


def _t8_quantities(terms: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Per-token Table 8 sums from the device counts: ratios over tokens with an active delta feature,
    the chance null |A_base| / F, and the shuffled null (delta' of another token against this h_base)."""
    out = {}
    for v in T8_VARIANTS:
        n_delta, n_base, shared = (terms[f"t8.{v}.{k}"].astype(np.float64) for k in ("n_delta", "n_base", "shared"))
        n_partner, shared_partner = (terms[f"t8.{v}.{k}"].astype(np.float64) for k in ("n_partner", "shared_partner"))
        active, active_partner = n_delta > 0, n_partner > 0
        out |= {
            f"t8.{v}.active": active.astype(np.float64),
            f"t8.{v}.ratio": np.where(active, shared / np.maximum(n_delta, 1), 0.0),
            f"t8.{v}.shared": shared, f"t8.{v}.n_delta": n_delta, f"t8.{v}.n_base": n_base,
            f"t8.{v}.chance": np.where(active, n_base / width, 0.0),
            f"t8.{v}.chance_pooled": n_delta * n_base / width,
            f"t8.{v}.s_active": active_partner.astype(np.float64),
            f"t8.{v}.s_ratio": np.where(active_partner, shared_partner / np.maximum(n_partner, 1), 0.0),
            f"t8.{v}.s_shared": shared_partner, f"t8.{v}.s_n_delta": n_partner,
        }
    return out


@dataclasses.dataclass(frozen=True)
class AdapterSums:
    """One adapter's evaluation pass at one layer: per-prompt sums and the dictionary facts they depend on."""

    sums: PromptSums
    seeds: tuple[int, ...]
    dictionary_width: int
    zero_latents: int  # dictionary latents active on a zero input
    zero_hat_norm: float  # ||dictionary(0)||


def adapter_pass(h_base: Float[np.ndarray, "T D"], delta: Float[np.ndarray, "T D"],
                 sample_index: Int[np.ndarray, " T"], partner: Int[np.ndarray, " T"], dictionary: DeviceSAE,
                 delta_saes: Mapping[int, DeviceSAE], *, active_threshold: float = 0.0, batch_rows: int = 1024,
                 on_batch: Callable[[int], None] = lambda n: None) -> AdapterSums:
    """Tables 4-8 sums for one adapter over the evaluation split in memory (rows aligned across arrays).

    `partner[t]` is the row whose delta stands in for token t's in the shuffled nulls (a permutation of the
    whole split, never within a batch).
    """
    if h_base.shape != delta.shape or sample_index.shape != h_base.shape[:1] or partner.shape != sample_index.shape:
        raise ValueError(f"adapter_pass: h_base {h_base.shape}, delta {delta.shape}, sample_index "
                         f"{sample_index.shape} and partner {partner.shape} must describe the same tokens")
    zero_hat, zero_on = dictionary.zero_input(active_threshold)
    mean_delta = delta.mean(axis=0, dtype=np.float64)  # [D]
    mean_base = h_base.mean(axis=0, dtype=np.float64)  # [D]
    consts = [jnp.asarray(zero_hat), jnp.asarray(zero_on), jnp.asarray(mean_delta, jnp.float32),
              jnp.float32(active_threshold)]
    acc = PromptSums()
    for start in range(0, h_base.shape[0], batch_rows):
        rows = slice(start, min(h_base.shape[0], start + batch_rows))
        base_b, delta_b = h_base[rows], delta[rows]  # [B, D]
        terms = _dictionary_terms(dictionary.params, dictionary.scale, jnp.asarray(base_b), jnp.asarray(delta_b),
                                  jnp.asarray(delta[partner[rows]]), *consts, cfg=dictionary.sae.cfg)
        seed_terms = {s: _sae_terms(sae.params, sae.scale, jnp.asarray(delta_b), sae.sae.cfg)
                      for s, sae in delta_saes.items()}
        terms = {k: np.asarray(v, np.float64) for k, v in terms.items()}
        d64, b64 = delta_b.astype(np.float64), base_b.astype(np.float64)
        d_sq, b_sq = np.einsum("bd,bd->b", d64, d64), np.einsum("bd,bd->b", b64, b64)  # [B]
        q = {"nz": (d_sq > 0).astype(np.float64), "d_sq": d_sq, "d_norm": np.sqrt(d_sq), "b_norm": np.sqrt(b_sq),
             "d_c": d64 - mean_delta, "b_c": b64 - mean_base,  # [B, D]: centred sums give the FVU denominators
             "b_c_sq": np.einsum("bd,bd->b", b64 - mean_base, b64 - mean_base)}
        for name in RECONS:
            q[f"{name}.err"] = terms[f"{name}.err"]
            q[f"{name}.ratio"] = _ratio(terms[f"{name}.err"], d_sq)
        q |= _t8_quantities(terms, dictionary.width)
        for s, (err, l0) in seed_terms.items():
            err = np.asarray(err, np.float64)
            q |= {f"sae{s}.err": err, f"sae{s}.ratio": _ratio(err, d_sq), f"sae{s}.l0": np.asarray(l0, np.float64)}
        acc.add(sample_index[rows], q)
        on_batch(base_b.shape[0])
    return AdapterSums(acc, tuple(delta_saes), dictionary.width, int(zero_on.sum()), float(np.linalg.norm(zero_hat)))


def base_pass(h_base: Float[np.ndarray, "T D"], sample_index: Int[np.ndarray, " T"],
              saes: Mapping[str, DeviceSAE], *, batch_rows: int = 1024) -> PromptSums:
    """Each SAE (the dictionary, base SAEs) reconstructing h_base: `<name>.err`, `<name>.ratio`, `<name>.l0`
    per prompt, with the centred sums `x_c` / `x_c_sq` and `x_sq` for their FVU and pooled errors."""
    mean = h_base.mean(axis=0, dtype=np.float64)  # [D]
    acc = PromptSums()
    for start in range(0, h_base.shape[0], batch_rows):
        rows = slice(start, min(h_base.shape[0], start + batch_rows))
        x64 = h_base[rows].astype(np.float64)
        x_sq = np.einsum("bd,bd->b", x64, x64)
        q = {"nz": (x_sq > 0).astype(np.float64), "x_sq": x_sq, "x_c": x64 - mean,
             "x_c_sq": np.einsum("bd,bd->b", x64 - mean, x64 - mean)}
        for name, sae in saes.items():
            f, x_hat = sae(h_base[rows])
            err = np.sum((x64 - x_hat) ** 2, axis=1)
            q |= {f"{name}.err": err, f"{name}.ratio": _ratio(err, x_sq), f"{name}.l0": (f > 0).sum(axis=1) * 1.0}
        acc.add(sample_index[rows], q)
    return acc
