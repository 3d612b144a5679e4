"""`splice`: the adapted models with their residual at layer L replaced, continued to the logits, in one jitted call.

One stacked pass (base + every adapter, the machinery of `residuals`) gives h_base and h_adapted at layer L and
every model's logits. Then each adapter's model continues from block L + 1 with its residual at L replaced by
each `Splice` in turn (the variants run one after another inside the call, so only one set of logits is live):

    base only            h_base                                  (the adapter's effect removed at L)
    delta SAE            h_base + recon(h_adapted - h_base)      (`SpliceInput.DELTA`)
    dictionary           h_base + recon(h_adapted) - recon(h_base)   (`SpliceInput.DIFFERENCE`)

with the SAE applied at every token, in its own normalisation (`lgeo_jax.sae.SAE`: it sees x / scale and
reconstructs in original units). Per prediction position the call returns KL(p_adapted || p_variant) and the
cross-entropy of the target token for every model and variant, and `splice` keeps the target tokens only
(`loss_mask`, the data pipeline's: 1 = token t is a target, predicted from position t - 1).

Rows: the stacked pass runs row b * (1 + A) + a (slot 0 the base), a continuation row b * A + a (adapter a),
as `lgeo_jax.model.Gemma2.prepare_inputs` lays them out.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from lgeo_jax.lora._adapters import LoraAdapters, prepare_adapters, stacked_lora
from lgeo_jax.lora._residuals import check_layers
from lgeo_jax.model import Gemma2
from lgeo_jax.sae import SAE, forward
from lgeo_jax.sharding import DEFAULT_RULES, LogicalAxisRules, mesh_context, mesh_of, place, put


class SpliceInput(enum.StrEnum):
    """What a splice's SAE reconstructs: the delta itself, or both streams (their reconstructions' difference)."""

    DELTA = "delta"  # h_base + recon(h_adapted - h_base)
    DIFFERENCE = "difference"  # h_base + recon(h_adapted) - recon(h_base)


@dataclasses.dataclass(frozen=True)
class Splice:
    """One replacement of the residual at layer L. `saes`: None (h_base alone), one SAE shared by every adapter
    (a layer's reference dictionary), or one per adapter in stack order (delta SAEs), all of one config."""

    name: str
    saes: SAE | Sequence[SAE] | None = None
    on: SpliceInput = SpliceInput.DELTA


@dataclasses.dataclass(frozen=True, eq=False)
class SpliceTokens:
    """Per target token (N of them, in batch-row order): KL and cross-entropy (nats) for every adapter."""

    names: tuple[str, ...]  # the splices, in order
    kl: Float[np.ndarray, "V A N"]  # KL(p_adapted || p_spliced)
    nll: Float[np.ndarray, "V A N"]  # -log p_spliced(target)
    nll_adapted: Float[np.ndarray, "A N"]  # -log p_adapted(target)
    nll_base: Float[np.ndarray, " N"]  # -log p_base(target)
    row: Int[np.ndarray, " N"]  # the batch row each token belongs to


def _splice_delta(spec, params, scale, h_base: jax.Array, h_adapted: jax.Array) -> jax.Array:
    """What one splice adds to h_base: [B, A, T, D] float32 from h_base [B, T, D] and h_adapted [B, A, T, D]."""
    on, cfg, shared = spec
    if cfg is None:
        return jnp.zeros_like(h_adapted)
    b, a, t, d = h_adapted.shape
    per_adapter = lambda x: x.swapaxes(0, 1).reshape(a, b * t, d)  # [B, A, T, D] -> [A, B*T, D]
    recon = jax.vmap(lambda p, s, x: forward(p, s, x, cfg)[1], in_axes=(None if shared else 0,) * 2 + (0,))
    base = jnp.broadcast_to(h_base[:, None], h_adapted.shape)  # [B, A, T, D]
    if on is SpliceInput.DELTA:
        out = recon(params, scale, per_adapter(h_adapted - base))  # [A, B*T, D]
    else:
        out = recon(params, scale, per_adapter(h_adapted)) - recon(params, scale, per_adapter(base))
    return out.reshape(a, b, t, d).swapaxes(0, 1)  # [B, A, T, D]


def _target_nll(logp: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target): logp [B, M, S, V], targets [B, S] -> [B, M, S]."""
    index = jnp.broadcast_to(targets[:, None, :, None], logp.shape[:3] + (1,))
    return -jnp.take_along_axis(logp, index, axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "n_adapters", "specs", "dtype"))
def _splice_jit(graphdef, state, lora_stacked, lora_adapters, input_ids, attention_mask, sae_params, sae_scales, *,
                layer, n_adapters, specs, dtype):
    model = nnx.merge(graphdef, state)
    n_layers, a = model.config.n_layers, n_adapters
    x, positions, valid = model.prepare_inputs(input_ids, attention_mask, 1 + a, dtype)  # [B*(1+A), T, ...]
    out, captured = model.run_blocks(x, positions, valid, n_layers=n_layers, capture=(layer,), lora=lora_stacked)
    b, t = input_ids.shape
    logp = jax.nn.log_softmax(model.logits(out), axis=-1)  # [B*(1+A), T, V]
    logp = logp.reshape(b, 1 + a, t, -1)[:, :, :-1]  # [B, 1+A, S, V]; S = T - 1 positions predicting 1..T-1
    targets = input_ids[:, 1:]  # [B, S]
    nll_models = _target_nll(logp, targets)  # [B, 1+A, S]
    logp_adapted = logp[:, 1:]  # [B, A, S, V]
    h = captured[0].reshape(b, 1 + a, t, -1)  # [B, 1+A, T, D] float32
    h_base, h_adapted = h[:, 0], h[:, 1:]
    replaced = jnp.stack([h_base[:, None] + _splice_delta(spec, p, s, h_base, h_adapted)
                          for spec, p, s in zip(specs, sae_params, sae_scales, strict=True)])  # [V, B, A, T, D]
    x_dtype = x.dtype
    # each continuation row is an adapter row (b * A + a), so its positions and validity are the prompt's
    positions, valid = (jnp.repeat(p[:: 1 + a], a, axis=0) for p in (positions, valid))  # [B*A, T]

    def continue_from_layer(r):  # r [B, A, T, D] -> KL [B, A, S], nll [B, A, S]
        x = r.reshape(b * a, t, -1).astype(x_dtype)
        x, _ = model.run_blocks(x, positions, valid, n_layers=n_layers, lora=lora_adapters, start=layer + 1)
        logp_v = jax.nn.log_softmax(model.logits(x), axis=-1).reshape(b, a, t, -1)[:, :, :-1]  # [B, A, S, V]
        kl = jnp.sum(jnp.exp(logp_adapted) * (logp_adapted - logp_v), axis=-1)  # [B, A, S]
        return kl, _target_nll(logp_v, targets)

    kl, nll = jax.lax.map(continue_from_layer, replaced)  # [V, B, A, S] each
    return kl, nll, nll_models


def _sae_stack(splice: Splice, n_adapters: int) -> tuple[tuple, dict | None, jax.Array | None]:
    """(static spec (input, config, shared), parameters, scales) of one splice; leading adapter axis unless shared."""
    if splice.saes is None:
        return (splice.on, None, True), None, None
    if isinstance(splice.saes, SAE):
        sae = splice.saes
        return ((splice.on, sae.cfg, True), {k: jnp.asarray(v, jnp.float32) for k, v in sae.params.items()},
                jnp.float32(sae.scale))
    saes = list(splice.saes)
    if len(saes) != n_adapters:
        raise ValueError(f"splice {splice.name!r}: {len(saes)} SAEs for {n_adapters} adapters; give one per "
                         "adapter (in stack order) or one shared SAE")
    cfgs = {sae.cfg for sae in saes}
    if len(cfgs) != 1:
        raise ValueError(f"splice {splice.name!r}: its SAEs differ in configuration ({sorted(map(str, cfgs))}); "
                         "one splice runs one SAE shape for every adapter")
    params = {k: jnp.stack([jnp.asarray(sae.params[k], jnp.float32) for sae in saes]) for k in saes[0].params}
    return (splice.on, saes[0].cfg, False), params, jnp.asarray([sae.scale for sae in saes], jnp.float32)


def splice(
    model: Gemma2,
    adapters: Sequence[LoraAdapters] | LoraAdapters,
    input_ids: Int[Array, "B T"],
    *,
    layer: int,
    splices: Sequence[Splice],
    attention_mask: Int[Array, "B T"] | None = None,
    loss_mask: Int[Array, "B T"] | None = None,
    dtype: jnp.dtype | None = None,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules = DEFAULT_RULES,
) -> SpliceTokens:
    """Every adapter's model with its residual at `layer` replaced by each of `splices`: KL to the adapted model
    and cross-entropy per target token (module docstring), in one jitted call.

    `loss_mask` [B, T]: 1 where token t is a target (default: every real token after a row's first). `dtype` is
    the activation dtype (default: the parameters'); runs on `mesh` (default: the model's) as `residuals` does.
    """
    mesh = mesh_of(model) if mesh is None else mesh
    stack = prepare_adapters(adapters, model.config, mesh=mesh, rules=rules)
    if stack is None:
        raise ValueError("splice: no adapters given; the splice replaces an adapted model's residual")
    (layer,) = check_layers([layer], model.config.n_layers)
    if not splices or len({s.name for s in splices}) != len(splices):
        raise ValueError(f"splice: need at least one splice, with distinct names (got {[s.name for s in splices]})")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if loss_mask is None:
        loss_mask = mask * (np.cumsum(mask, axis=1) > 1)  # real tokens after each row's first
    targets = np.asarray(loss_mask, np.int32)
    for name, m in (("attention_mask", mask), ("loss_mask", targets)):
        if m.shape != ids.shape:
            raise ValueError(f"{name} shape {m.shape} != input_ids shape {ids.shape}")
    stacks = [_sae_stack(s, len(stack)) for s in splices]
    for s, (spec, _, _) in zip(splices, stacks, strict=True):
        if spec[1] is not None and spec[1].d_in != model.config.d_model:
            raise ValueError(f"splice {s.name!r}: SAE d_in {spec[1].d_in} != the model's d_model "
                             f"{model.config.d_model}")
    graphdef, state = nnx.split(place(model, mesh, rules))
    with mesh_context(mesh):
        kl, nll, nll_models = _splice_jit(
            graphdef, state, stacked_lora(stack), stacked_lora(stack, with_base=False),
            *(put(x, ("batch", None), mesh, rules) for x in (ids.astype(np.int32), mask)),
            tuple(p for _, p, _ in stacks), tuple(s for _, _, s in stacks), layer=layer, n_adapters=len(stack),
            specs=tuple(spec for spec, _, _ in stacks), dtype=None if dtype is None else jnp.dtype(dtype).name)
    rows, cols = np.nonzero(targets[:, 1:])  # [N] each: target token t = cols + 1 is predicted at position cols
    kl, nll, nll_models = (np.asarray(x, np.float32) for x in (kl, nll, nll_models))
    return SpliceTokens(names=tuple(s.name for s in splices), kl=kl[:, rows, :, cols].transpose(1, 2, 0),
                        nll=nll[:, rows, :, cols].transpose(1, 2, 0), nll_adapted=nll_models[rows, 1:, cols].T,
                        nll_base=nll_models[rows, 0, cols], row=rows)
