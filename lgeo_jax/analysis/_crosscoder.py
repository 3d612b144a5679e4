"""Crosscoder latents: decoder-norm classes, the two decoders' cosine, latent scaling, and the comparison of
adapter-only latents with the delta SAEs, each beside its null.

- ``norm_diff_j = ((||d_j^a|| - ||d_j^b||) / max(||d_j^a||, ||d_j^b||) + 1) / 2`` (Minder et al. 2025,
  "Overcoming sparsity artifacts in crosscoders"): 0 base-only, 0.5 shared, 1 adapter-only; classes by the
  `crosscoder` section's thresholds.
- Latent scaling: for latent j with direction d_j (its own stream's decoder, original units) and activations
  f_tj, the closed-form least squares ``beta = argmin_b sum_t ||b f_tj d_j - y_tj||^2
  = sum_t f_tj <d_j, y_tj> / (||d_j||^2 sum_t f_tj^2)`` for the targets y = the stream's activation
  (reconstruction) and y = its reconstruction error with the latent's own contribution put back (error),
  in both streams. ``nu = beta(other stream) / beta(own stream)``: an adapter-only latent with small ``nu_error``
  and ``nu_recon`` explains something the base really lacks; ``nu ~ 1`` marks a sparsity artefact
  (Complete Shrinkage / Latent Decoupling in the paper's terms).
- Adapter-only directions ``d_j^a - d_j^b`` against the delta SAE's decoder rows: mean max-cosine (bootstrap
  over latents) and mean Hungarian-matched cosine, beside random directions and the same number of latents
  of random-init crosscoders (Monte Carlo intervals), with `vs_null` verdicts.
"""

from __future__ import annotations

import jax
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._layer import measure
from lgeo_jax.analysis._tokens import DeviceSAE, firing_counts
from lgeo_jax.crosscoder import Crosscoder, CrosscoderConfig, init_params
from lgeo_jax.geometry import hungarian_match, max_cosine, null_matching, null_max_cosine
from lgeo_jax.sae import SAE
from lgeo_jax.stats import bootstrap_items, null_interval, vs_null

CLASSES = ("base_only", "shared", "adapter_only", "other")
HIST_BINS = 20  # norm_diff histogram bins over [0, 1] (the report's plot)
POOLS = {"adapter_only": 1, "base_only": 0}  # pool -> the stream whose decoder is the latents' own
_NULL_TAG = 0x63636E6C  # folded into random-init keys: training inits from jax.random.key(seed) itself


def norm_diff(decoders: Float[np.ndarray, "F 2 D"]) -> Float[np.ndarray, " F"]:
    """Relative decoder-norm difference in [0, 1] (NaN for a latent with both decoders zero)."""
    norms = np.linalg.norm(np.asarray(decoders, np.float64), axis=-1)  # [F, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((norms[:, 1] - norms[:, 0]) / norms.max(axis=1) + 1) / 2


def latent_classes(nd: Float[np.ndarray, " F"], cfg: CrosscoderConfig) -> np.ndarray:
    """Index into `CLASSES` per latent (`other`: between the class bands, or undefined)."""
    lo, hi = cfg.shared_range
    return np.select([nd < cfg.base_only_max, (nd >= lo) & (nd <= hi), nd > cfg.adapter_only_min], [0, 1, 2], 3)


def decoder_cosine(decoders: Float[np.ndarray, "F 2 D"]) -> Float[np.ndarray, " F"]:
    """Cosine between each latent's base and adapted decoder directions (NaN where one is zero)."""
    w = np.asarray(decoders, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(w[:, 0] * w[:, 1], axis=-1) / np.prod(np.linalg.norm(w, axis=-1), axis=-1)


def closed_form_beta(f: Float[np.ndarray, "N J"], d: Float[np.ndarray, "J D"], y: Float[np.ndarray, "N D"],
                     own: Float[np.ndarray, "J D"] | None = None) -> Float[np.ndarray, " J"]:
    """Per latent j, ``argmin_b sum_t ||b f_tj d_j - (y_t + f_tj own_j)||^2`` in float64 (``own``: the latent's
    own contribution put back into an error target; None for a reconstruction target). NaN for a latent that
    never fires."""
    f, d, y = (np.asarray(a, np.float64) for a in (f, d, y))
    f2 = np.sum(f**2, axis=0)  # [J]
    num = np.einsum("nj,nd,jd->j", f, y, d)  # [J]
    if own is not None:
        num = num + f2 * np.einsum("jd,jd->j", d, np.asarray(own, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (np.sum(d**2, axis=-1) * f2)


def latent_scaling(cc: Crosscoder, x: Float[np.ndarray, "N E"], latents: np.ndarray, own_stream: int,
                   chunk: int = 4096) -> dict[str, np.ndarray]:
    """β for reconstruction and error in both streams and the ν ratios (other / own stream) of `latents`,
    whose direction is their `own_stream` (0 base, 1 adapted) decoder; ``x`` = ``[h_base; h_adapted]``
    rows in original units (encoded in chunks of `chunk` rows)."""
    latents = np.asarray(latents, np.int64)
    dec = cc.decoders() * cc.scale  # [F, 2, D] original units
    d = dec[latents, own_stream]  # [J, D]
    f_parts, hat_parts = [], []
    for start in range(0, x.shape[0], chunk):
        f_all = cc.encode(np.asarray(x[start:start + chunk], np.float32))  # [C, F]
        f_parts.append(np.asarray(f_all)[:, latents])
        hat_parts.append(np.asarray(cc.decode(f_all)))
    f, x_hat = np.concatenate(f_parts), np.concatenate(hat_parts)  # [N, J], [N, E]
    n_dim, out = cc.d_in, {}
    for s, stream in enumerate(("base", "adapted")):
        h = np.asarray(x[:, s * n_dim:(s + 1) * n_dim], np.float64)  # [N, D]
        out[f"beta_recon_{stream}"] = closed_form_beta(f, d, h)
        out[f"beta_error_{stream}"] = closed_form_beta(f, d, h - x_hat[:, s * n_dim:(s + 1) * n_dim], dec[latents, s])
    own, other = ("adapted", "base") if own_stream == 1 else ("base", "adapted")
    with np.errstate(invalid="ignore", divide="ignore"):
        for t in ("recon", "error"):
            out[f"nu_{t}"] = out[f"beta_{t}_{other}"] / out[f"beta_{t}_{own}"]
    return out


def random_init_decoders(d_in: int, cfg: CrosscoderConfig, *, seed: int, draw: int) -> Float[np.ndarray, "F 2 D"]:
    """Decoders of a freshly initialised crosscoder of this shape, independent of every trained one's start."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NULL_TAG), draw)
    return np.asarray(init_params(key, d_in, cfg)["W_dec"]).reshape(cfg.width, 2, d_in)


def live_sae_rows(sae: SAE, delta: Float[np.ndarray, "N D"], min_density: float) -> Float[np.ndarray, "M D"]:
    """The decoder rows of the latents of `sae` that are live on `delta` (fire on more than `min_density` of its
    rows): dead latents' rows would dilute the comparison, as Table 9 leaves them out."""
    counts = firing_counts([delta], {"sae": DeviceSAE(sae)})["sae"]
    return np.asarray(sae.params["W_dec"], np.float32)[counts.live(min_density)]


def compare_adapter_only(directions: Float[np.ndarray, "J D"], sae_rows: Float[np.ndarray, "M D"],
                         cfg: CrosscoderConfig, *, null_samples: int, seed: int, n_boot: int,
                         level: float) -> dict:
    """Max-cosine and matching of adapter-only directions against delta-SAE decoder rows (its live ones, as
    the stage passes them), beside nulls."""
    j, (m, d) = directions.shape[0], sae_rows.shape
    if j == 0 or m == 0:  # nothing to compare: no adapter-only latent, or a delta SAE without live rows
        return {"n_latents": j, "sae_rows": m}
    mc = np.asarray(max_cosine(directions, sae_rows), np.float64)  # [J]
    matched = float(np.mean(hungarian_match(directions, sae_rows)[2], dtype=np.float64))
    est = bootstrap_items(mc, n_boot=n_boot, seed=seed, level=level)
    random_mc = np.array([np.mean(np.asarray(null_max_cosine(j, m, d, seed=seed + r), np.float64))
                          for r in range(null_samples)])
    random_match = np.array([null_matching(j, m, d, seed=seed + r) for r in range(null_samples)])
    init_mc = []
    for r in range(null_samples):
        dec = random_init_decoders(d, cfg, seed=seed, draw=r)[:j]  # [J, 2, D]
        init_mc.append(np.mean(np.asarray(max_cosine(dec[:, 1] - dec[:, 0], sae_rows), np.float64)))
    null_random, null_init = null_interval(random_mc, level=level), null_interval(np.array(init_mc), level=level)
    null_match = null_interval(random_match, level=level)
    return {"n_latents": j, "sae_rows": m,
            "max_cosine": {**measure(est), "vs_null": vs_null(est, null_random),
                           "vs_random_init": vs_null(est, null_init)},
            "null_random": measure(null_random), "null_random_init": measure(null_init),
            "matched_cosine": matched, "null_matched_cosine": measure(null_match),
            "matched_vs_null": int(matched > null_match.high) - int(matched < null_match.low)}


def _median_ci(values: np.ndarray, n_boot: int, seed: int, level: float) -> dict:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    return {**measure(bootstrap_items(values, np.median, n_boot=n_boot, seed=seed, level=level)), "n": int(values.size)}


def analyze_crosscoder(cc: Crosscoder, x: Float[np.ndarray, "N E"], sae_rows: Float[np.ndarray, "M D"] | None,
                       *, null_samples: int, seed: int, n_boot: int,
                       level: float) -> tuple[dict, dict[str, np.ndarray]]:
    """The report record of one crosscoder (class counts and fractions, decoder cosine per class, latent-scaling
    medians with CIs per pool, the delta-SAE comparison) and its per-latent arrays (for plots)."""
    dec = cc.decoders()  # [F, 2, D]
    nd, cos = norm_diff(dec), decoder_cosine(dec)
    cls = latent_classes(nd, cc.cfg)
    arrays: dict[str, np.ndarray] = {"norm_diff": nd, "decoder_cosine": cos, "class": cls}
    record: dict = {"width": cc.cfg.width, "d_in": cc.d_in,
                    "classes": {name: int(np.sum(cls == i)) for i, name in enumerate(CLASSES)},
                    "decoder_cosine": {name: _median_ci(cos[cls == i], n_boot, seed, level)
                                       for i, name in enumerate(CLASSES[:3])}}
    # the null of the norm-ratio classes: a random-init crosscoder's latents all sit near 0.5
    init_nd = norm_diff(random_init_decoders(cc.d_in, cc.cfg, seed=seed, draw=0))
    record["random_init_classes"] = {name: int(np.sum(latent_classes(init_nd, cc.cfg) == i))
                                     for i, name in enumerate(CLASSES)}
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    record["norm_diff_hist"] = {"edges": edges.tolist(),
                                "counts": np.histogram(nd[np.isfinite(nd)], edges)[0].tolist(),
                                "random_init_counts": np.histogram(init_nd, edges)[0].tolist()}
    record["scaling"] = {}
    for pool, own in POOLS.items():
        idx = np.flatnonzero(cls == CLASSES.index(pool))
        scaling = latent_scaling(cc, x, idx, own)
        arrays.update({f"{pool}.{k}": v for k, v in scaling.items()} | {f"{pool}.latents": idx})
        record["scaling"][pool] = {k: _median_ci(v, n_boot, seed, level) for k, v in scaling.items()}
        both = np.isfinite(scaling["nu_recon"]) & np.isfinite(scaling["nu_error"])  # the report's scatter
        record["scaling"][pool]["points"] = {k: scaling[k][both].tolist() for k in ("nu_recon", "nu_error")}
    if sae_rows is not None:
        idx = np.flatnonzero(cls == CLASSES.index("adapter_only"))
        directions = dec[idx, 1] - dec[idx, 0]  # [J, D]
        record["vs_delta_sae"] = compare_adapter_only(directions, np.asarray(sae_rows, np.float32), cc.cfg,
                                                      null_samples=null_samples, seed=seed, n_boot=n_boot, level=level)
    return record, arrays

