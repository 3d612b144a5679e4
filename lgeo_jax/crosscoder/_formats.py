"""The `Crosscoder` value (config, parameters, RMS scale), its on-disk format and its training health.

Format (a directory, written atomically by the trainer): ``crosscoder.safetensors`` with float32 ``W_enc
[2D, F]``, ``b_enc [F]``, ``W_dec [F, 2D]`` (row j = ``[d_j^base; d_j^adapted]``), ``b_dec [2D]`` (+
``threshold [F]`` for BatchTopK, compared with ``f_j * (||d_j^base|| + ||d_j^adapted||)``), all in crosscoder
units; ``cfg.json`` with ``format: lgeo_crosscoder``, the `crosscoder` section, ``d_in`` (D, per stream),
``scale`` (the RMS scale s: inputs are divided by it, reconstructions multiplied) and name / seed / steps.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lgeo_jax.config import from_dict, to_plain
from lgeo_jax.crosscoder._config import CrossArch, CrosscoderConfig
from lgeo_jax.crosscoder._models import decode, encode
from lgeo_jax.files import atomic_write_json, read_json
from lgeo_jax.sae import SAE, Arch, SAEConfig, SAEHealth, sae_health
from lgeo_jax.safetensors_io import read_safetensors, write_safetensors

WEIGHTS, CFG = "crosscoder.safetensors", "cfg.json"


@dataclasses.dataclass(frozen=True)
class Crosscoder:
    """A trained crosscoder; `encode` takes ``[B, 2D]`` = ``[h_base; h_adapted]`` in original units."""

    cfg: CrosscoderConfig
    params: dict[str, np.ndarray]
    scale: float = 1.0

    def __post_init__(self):
        names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if self.cfg.architecture is CrossArch.BATCHTOPK
                                                         else set())
        if set(self.params) != names:
            raise ValueError(f"crosscoder params are {sorted(self.params)}, expected {sorted(names)}")
        f, e = np.shape(self.params["W_dec"])
        if f != self.cfg.width or e % 2 or np.shape(self.params["W_enc"]) != (e, f):
            raise ValueError(f"crosscoder W_dec {np.shape(self.params['W_dec'])} / W_enc "
                             f"{np.shape(self.params['W_enc'])} do not fit width {self.cfg.width} and two streams")

    @property
    def d_in(self) -> int:
        """Width of one stream (D)."""
        return np.shape(self.params["W_dec"])[1] // 2

    def decoders(self) -> Float[np.ndarray, "F 2 D"]:
        """Per latent its base (index 0) and adapted (index 1) decoder direction, crosscoder units."""
        return np.asarray(self.params["W_dec"]).reshape(self.cfg.width, 2, self.d_in)

    def encode(self, x: Float[Array, "B E"]) -> Float[Array, "B F"]:
        return encode(self.params, jnp.asarray(x, jnp.float32) / self.scale, self.cfg)

    def decode(self, f: Float[Array, "B F"]) -> Float[Array, "B E"]:
        return decode(self.params, jnp.asarray(f, jnp.float32)) * self.scale


def save_crosscoder(path: str | pathlib.Path, cc: Crosscoder, extra: Mapping | None = None) -> None:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS, {k: np.asarray(v, np.float32) for k, v in cc.params.items()})
    atomic_write_json(path / CFG, {"format": "lgeo_crosscoder", "version": 1, "crosscoder": to_plain(cc.cfg),
                                   "d_in": cc.d_in, "scale": float(cc.scale), **(extra or {})})


def load_crosscoder(path: str | pathlib.Path) -> Crosscoder:
    path = pathlib.Path(path)
    meta = read_json(path / CFG, needed_by="load_crosscoder")
    if meta.get("format") != "lgeo_crosscoder":
        raise ValueError(f"{path / CFG}: not a crosscoder (format {meta.get('format')!r}, expected 'lgeo_crosscoder')")
    cfg = from_dict(CrosscoderConfig, meta["crosscoder"], source=str(path / CFG))
    return Crosscoder(cfg, read_safetensors(path / WEIGHTS, dtype=np.float32), float(meta["scale"]))


def crosscoder_health(cc: Crosscoder, initial_decoder: np.ndarray, metrics: Mapping[str, float | None]) -> SAEHealth:
    """The SAE package's training health of the crosscoder viewed as an SAE on ``[h_base; h_adapted]``. L0
    target: ``[k / 2, 2 k]`` for BatchTopK (its inference gate should keep about k), ``[1, D]`` for L1."""
    k = cc.cfg.k
    target = (k / 2, 2 * k) if cc.cfg.architecture is CrossArch.BATCHTOPK else (1.0, float(cc.d_in))
    as_sae = SAE(SAEConfig(2 * cc.d_in, cc.cfg.width, Arch.RELU),
                 {n: np.asarray(cc.params[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, cc.scale)
    return sae_health(as_sae, initial_decoder, metrics, target)
