"""One pass over a layer's evaluation tokens: everything in Tables 5, 6, 8 and 11 for one adapter.

Tables 5 and 6 are computed here on the *same* batches with the *same* `ErrorSums`, so Table 7's ratio
compares like with like. Per batch (rows of h_base [B, D] and the adapter's delta [B, D]):
  - dictionary (Gemma Scope) on delta                    -> Table 5 "direct"
  - dictionary(h_base + delta) - dictionary(h_base) vs delta -> Table 5 "difference"
  - every seed's delta SAE on delta                      -> Table 6 (+ which latents fire: dead fraction)
  - dictionary features on delta vs on h_base             -> Table 8
  - streaming CKA(delta, h_base), CKA(h_base, h_adapted) -> Table 11, with a shuffled-token null
SAE forwards run jitted in float32; sums are float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from lgeo_jax.analysis._overlap import OverlapSums
from lgeo_jax.analysis._recon import ErrorSums
from lgeo_jax.geometry import StreamingCKA
from lgeo_jax.sae import SAE, SAEConfig, decode, encode


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params: dict, scale: jax.Array, x: jax.Array, cfg: SAEConfig) -> tuple[jax.Array, jax.Array]:
    f = encode(params, x / scale, cfg)  # [B, F]
    return f, decode(params, f) * scale  # [B, F], [B, D]


class DeviceSAE:
    """An SAE with its parameters on the device once, and a jitted forward in original units."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self._params = {k: jnp.asarray(v, jnp.float32) for k, v in sae.params.items()}
        self._scale = jnp.float32(sae.scale)

    @property
    def width(self) -> int:
        return self.sae.cfg.d_sae

    def __call__(self, x: Float[np.ndarray, "B D"]) -> tuple[np.ndarray, np.ndarray]:
        """Feature activations [B, F] and reconstruction [B, D] (float32 numpy, original units)."""
        f, x_hat = jax.block_until_ready(_forward(self._params, self._scale, jnp.asarray(x, jnp.float32),
                                                  self.sae.cfg))
        return np.asarray(f), np.asarray(x_hat)


@dataclasses.dataclass
class FiringCounts:
    """How often each latent fires (f > 0) and the summed L0, over the tokens seen."""

    counts: np.ndarray
    n: int = 0

    @classmethod
    def zeros(cls, width: int) -> FiringCounts:
        return cls(np.zeros(width, np.int64))

    def add(self, f: np.ndarray) -> None:
        self.counts += (f > 0).sum(axis=0)
        self.n += f.shape[0]

    @property
    def live(self) -> np.ndarray:
        return self.counts > 0

    def result(self) -> dict[str, float]:
        return {"l0": float(self.counts.sum() / max(self.n, 1)), "dead_fraction": float(np.mean(~self.live)),
                "live": int(self.live.sum())}


@dataclasses.dataclass
class BaseResult:
    """A layer's h_base pass: the dictionary's own reconstruction quality and every base SAE's firing."""

    dictionary: ErrorSums
    dictionary_firing: FiringCounts
    base_saes: dict[int, ErrorSums]
    base_firing: dict[int, FiringCounts]

    def summary(self) -> dict:
        return {"dictionary_on_base": {**self.dictionary.result(), **self.dictionary_firing.result()},
                "base_saes": {str(s): {**self.base_saes[s].result(), **self.base_firing[s].result()}
                              for s in self.base_saes}}


@dataclasses.dataclass
class AdapterResult:
    """One adapter's pass at one layer (see the module docstring for which table each field feeds)."""

    direct: ErrorSums
    difference: ErrorSums
    delta_saes: dict[int, ErrorSums]
    firing: dict[int, FiringCounts]
    overlap: OverlapSums
    cka: dict[str, StreamingCKA]

    def summary(self) -> dict:
        return {
            "table5": {"direct": self.direct.result(), "difference": self.difference.result()},
            "table6": {str(s): {**self.delta_saes[s].result(), **self.firing[s].result()} for s in self.delta_saes},
            "table8": self.overlap.result(),
            "table11": {name: acc.result() for name, acc in self.cka.items()},
        }


def base_pass(batches: Iterable[Float[np.ndarray, "B D"]], dictionary: DeviceSAE,
              base_saes: Mapping[int, DeviceSAE]) -> BaseResult:
    """The dictionary and each base SAE on h_base batches."""
    out = BaseResult(ErrorSums(), FiringCounts.zeros(dictionary.width), {s: ErrorSums() for s in base_saes},
                     {s: FiringCounts.zeros(sae.width) for s, sae in base_saes.items()})
    for h_base in batches:
        f, x_hat = dictionary(h_base)
        out.dictionary.add(h_base, x_hat)
        out.dictionary_firing.add(f)
        for seed, sae in base_saes.items():
            f, x_hat = sae(h_base)
            out.base_saes[seed].add(h_base, x_hat)
            out.base_firing[seed].add(f)
    return out


def adapter_pass(batches: Iterable[tuple[Float[np.ndarray, "B D"], Float[np.ndarray, "B D"]]],
                 dictionary: DeviceSAE, delta_saes: Mapping[int, DeviceSAE], *,
                 active_threshold: float = 0.0) -> AdapterResult:
    """Tables 5, 6, 8, 11 for one adapter from (h_base, delta) batches of the same tokens."""
    out = AdapterResult(ErrorSums(), ErrorSums(), {s: ErrorSums() for s in delta_saes},
                        {s: FiringCounts.zeros(sae.width) for s, sae in delta_saes.items()},
                        OverlapSums(threshold=active_threshold),
                        {name: StreamingCKA() for name in ("delta_base", "base_adapted", "null_delta_base",
                                                           "null_base_adapted")})
    for h_base, delta in batches:
        if h_base.shape != delta.shape:
            raise ValueError(f"adapter_pass: h_base {h_base.shape} and delta {delta.shape} batches differ")
        h_adapted = h_base + delta  # [B, D] float32
        f_delta, delta_hat = dictionary(delta)
        f_base, base_hat = dictionary(h_base)
        _, adapted_hat = dictionary(h_adapted)
        out.direct.add(delta, delta_hat)
        out.difference.add(delta, adapted_hat - base_hat)
        out.overlap.add(f_delta, f_base)
        for seed, sae in delta_saes.items():
            f, x_hat = sae(delta)
            out.delta_saes[seed].add(delta, x_hat)
            out.firing[seed].add(f)
        out.cka["delta_base"].update(delta, h_base)
        out.cka["base_adapted"].update(h_base, h_adapted)
        if h_base.shape[0] >= 2:  # the null pairs each token with another token's base row
            other = np.roll(h_base, h_base.shape[0] // 2, axis=0)  # [B, D]
            out.cka["null_delta_base"].update(delta, other)
            out.cka["null_base_adapted"].update(other, h_adapted)
    return out
