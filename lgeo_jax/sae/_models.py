"""SAE forward passes (ReLU, JumpReLU, TopK, BatchTopK) as pure functions of a parameter dict, plus the `SAE`
value. These are the inference forms; training-time activations and losses are in `_losses`.

Parameters are a plain dict ``{"W_enc" [D, F], "b_enc" [F], "W_dec" [F, D], "b_dec" [D]}`` (+ ``"threshold"
[F]`` for JumpReLU and BatchTopK): the SAELens / Gemma Scope names and layouts, so formats map one to one and a leading
SAE axis ``S`` can be added by ``jax.vmap`` for training many at once. Einsum letters: B tokens, D d_in,
F d_sae. The functions work in *SAE units* (input already divided by the RMS scale); `SAE` wraps them in
original units.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lgeo_jax.sae._config import Arch, SAEConfig

Params = dict[str, jax.Array]

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def param_names(cfg: SAEConfig) -> tuple[str, ...]:
    """Keys a parameter dict of this architecture must hold."""
    return PARAM_NAMES + (("threshold",) if cfg.architecture.has_threshold else ())


def init_params(key: jax.Array, cfg: SAEConfig) -> Params:
    """Random unit-norm decoder rows, encoder = decoder transpose (SAELens' init), zero biases/threshold.

    Tied init makes every latent start as a matched filter for its own direction, which keeps few latents
    dead at the start; b_dec is set later from data (`_train.init_b_dec`).
    """
    w_dec = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)  # [F, D]
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    params = {"W_enc": w_dec.T, "b_enc": jnp.zeros(cfg.d_sae, jnp.float32), "W_dec": w_dec,
              "b_dec": jnp.zeros(cfg.d_in, jnp.float32)}
    if cfg.architecture.has_threshold:
        params["threshold"] = jnp.zeros(cfg.d_sae, jnp.float32)
    return params


def matmul(x: Float[Array, "B K"], w: Float[Array, "K N"], dtype: str | None = None) -> Float[Array, "B N"]:
    """``x @ w`` in float32 or, with ``dtype`` ("bfloat16"), on operands rounded to it with float32 accumulation,
    in the backward pass too: the gradients ``g w^T`` and ``x^T g`` multiply the rounded operands and the output
    gradient rounded to ``dtype`` (float32 master weights and gradients either way)."""
    if dtype is None:
        return jnp.einsum("bk,kn->bn", x, w)
    return _low_precision_matmul(x, w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    return jnp.einsum("bk,kn->bn", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _low_precision_fwd(x, w, dtype):
    x_low, w_low = x.astype(dtype), w.astype(dtype)
    return jnp.einsum("bk,kn->bn", x_low, w_low, preferred_element_type=jnp.float32), (x_low, w_low)


def _low_precision_bwd(dtype, res, g):
    x_low, w_low = res
    g_low = g.astype(dtype)  # [B, N]
    dx = jnp.einsum("bn,kn->bk", g_low, w_low, preferred_element_type=jnp.float32)  # [B, K]
    dw = jnp.einsum("bk,bn->kn", x_low, g_low, preferred_element_type=jnp.float32)  # [K, N]
    return dx, dw


_low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


def pre_activations(params: Params, x: Float[Array, "B D"], cfg: SAEConfig,
                    matmul_dtype: str | None = None) -> Float[Array, "B F"]:
    """Encoder pre-activations; ReLU / TopK / BatchTopK subtract b_dec from the input first, JumpReLU does not.
    ``matmul_dtype``: see `matmul` (None: float32)."""
    w_enc, b_enc = params["W_enc"], params["b_enc"]
    if not cfg.architecture.subtracts_b_dec:
        return matmul(x, w_enc, matmul_dtype) + b_enc  # [B, F]
    # (x - b_dec) W_enc, with b_dec's gradient taken through `b_dec - stop_gradient(b_dec)` (exactly 0 forward, so
    # the values are unchanged): autodiff of (x - b_dec) W_enc would form d_pre W_enc^T, a [B, F] x [F, D] GEMM
    # (1/6 of a training step's FLOPs), only to sum it over tokens; this way it is the GEMV
    # -(sum_b d_pre) W_enc^T (bench/README.md (b)).
    b_dec = params["b_dec"]
    centred = matmul(x - jax.lax.stop_gradient(b_dec), w_enc, matmul_dtype)  # [B, F]
    return centred - jnp.einsum("d,df->f", b_dec - jax.lax.stop_gradient(b_dec), w_enc) + b_enc  # [B, F]


def activate(params: Params, pre: Float[Array, "B F"], cfg: SAEConfig) -> Float[Array, "B F"]:
    """Latent activations from pre-activations (the architecture's inference nonlinearity; BatchTopK runs as
    the JumpReLU gate at its learnt threshold, as SAELens saves it)."""
    if cfg.architecture is Arch.RELU:
        return jax.nn.relu(pre)
    if cfg.architecture.has_threshold:
        return jnp.where(pre > params["threshold"], jax.nn.relu(pre), 0.0)
    values, idx = jax.lax.top_k(pre, cfg.k)  # [B, K]
    rows = jnp.arange(pre.shape[0])[:, None]  # [B, 1]
    return jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(values))


def encode(params: Params, x: Float[Array, "B D"], cfg: SAEConfig) -> Float[Array, "B F"]:
    return activate(params, pre_activations(params, x, cfg), cfg)


def decode(params: Params, f: Float[Array, "B F"], matmul_dtype: str | None = None) -> Float[Array, "B D"]:
    return matmul(f, params["W_dec"], matmul_dtype) + params["b_dec"]  # [B, D]


def forward(params: Params, scale: jax.Array, x: Float[Array, "B D"],
            cfg: SAEConfig) -> tuple[Float[Array, "B F"], Float[Array, "B D"]]:
    """Latents and reconstruction of x in original units (the SAE sees x / scale), on traced parameters."""
    f = encode(params, x / scale, cfg)  # [B, F]
    return f, decode(params, f) * scale  # [B, F], [B, D]


@dataclasses.dataclass(frozen=True)
class SAE:
    """One SAE ready to use: config, parameters (SAE units) and the RMS scale ``s`` it was trained with.

    ``encode`` takes activations in original units (divides by ``s``), ``decode`` returns original units
    (multiplies by ``s``), so ``decode(encode(x))`` reconstructs ``x`` directly. Loaded third-party SAEs
    have ``scale = 1``.
    """

    cfg: SAEConfig
    params: dict[str, np.ndarray]
    scale: float = 1.0

    def __post_init__(self):
        missing = set(param_names(self.cfg)) - set(self.params)
        if missing:
            raise ValueError(f"SAE params are missing {sorted(missing)} for arch {self.cfg.architecture.value!r}")
        d, f = self.cfg.d_in, self.cfg.d_sae
        want = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,), "threshold": (f,)}
        for name in param_names(self.cfg):
            if tuple(self.params[name].shape) != want[name]:
                raise ValueError(f"SAE param {name} has shape {tuple(self.params[name].shape)}, expected "
                                 f"{want[name]} for d_in={d}, d_sae={f}")
        if not self.scale > 0:
            raise ValueError(f"SAE scale must be positive, got {self.scale}")

    def encode(self, x: Float[Array, "B D"]) -> Float[Array, "B F"]:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE.encode: input has d={x.shape[-1]}, SAE expects d_in={self.cfg.d_in}")
        return encode(self.params, jnp.asarray(x, jnp.float32) / self.scale, self.cfg)

    def decode(self, f: Float[Array, "B F"]) -> Float[Array, "B D"]:
        return decode(self.params, jnp.asarray(f, jnp.float32)) * self.scale

    def reconstruct(self, x: Float[Array, "B D"]) -> Float[Array, "B D"]:
        return self.decode(self.encode(x))
