"""ReLU SAE training in torch with lgeo_jax's conventions, three ways: a loop over SAEs, all SAEs batched with
`torch.bmm`, and SAELens' own trainer.

Conventions (docs/conventions.md, lgeo_jax/sae/_step.py): each SAE's input is divided by its RMS scale
``s = sqrt(mean_t ||x_t||^2 / d)``; ``f = relu((x - b_dec) W_enc + b_enc)``, ``x_hat = f W_dec + b_dec``;
``loss = mean_t sum_d (x_hat - x)^2 + l1 * mean_t sum_latents f``; Adam; decoder rows renormalised to unit
norm after every step, optionally (``remove_parallel_grad``) after dropping the decoder gradient's component
along each row first, as SAELens and lgeo_jax's current step do. Parameters use SAELens / Gemma Scope names
and layouts (``W_enc [D, F]``, ``W_dec [F, D]``), stacked over a leading SAE axis S.

Data: ``x [S, N, D]`` float32 in original units, one row set per SAE; step t reads the contiguous batch
``t mod (N // batch_size)`` (shuffle the rows beforehand). The default init is lgeo_jax's (random unit
decoder rows, ``W_enc = W_dec^T``, zero biases); lgeo_jax sets b_dec from the data (geometric median), so
pass ``params`` to start both sides from identical weights.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._threads import set_threads

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclasses.dataclass
class TrainedSAEs:
    """Result of training S SAEs: parameters in SAE units (multiply reconstructions by ``scales``)."""

    params: dict[str, np.ndarray]  # W_enc [S, D, F], b_enc [S, F], W_dec [S, F, D], b_dec [S, D]
    scales: np.ndarray  # [S] RMS scale each SAE's input was divided by
    losses: np.ndarray  # [S, steps] loss of each step's batch before that step's update
    seconds: float  # wall time of the training steps (setup excluded)


def init_params(n_sae: int, d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Stacked lgeo_jax-style init: random unit-norm decoder rows, encoder = decoder transpose, zero biases."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_sae, d_sae, d_in, generator=g)  # [S, F, D]
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": w_dec.transpose(1, 2).contiguous().numpy(), "b_enc": np.zeros((n_sae, d_sae), np.float32),
            "W_dec": w_dec.numpy(), "b_dec": np.zeros((n_sae, d_in), np.float32)}


def rms_scales(x: np.ndarray) -> np.ndarray:
    """[S] RMS scale ``sqrt(mean_t ||x_t||^2 / d)`` of each SAE's rows ``x [S, N, D]``."""
    x = torch.from_numpy(np.asarray(x, np.float32))
    row_sq = torch.einsum("snd,snd->sn", x, x)  # [S, N] float32 sums over d are accurate
    return np.sqrt(row_sq.double().mean(-1).numpy() / x.shape[2]).astype(np.float32)  # mean over N in float64


def sae_loss(params: dict[str, torch.Tensor], x: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """Per-SAE loss [S] of a batch ``x [S, B, D]`` in SAE units; ``params`` stacked over S, ``l1 [S]``."""
    pre = torch.baddbmm(params["b_enc"][:, None], x - params["b_dec"][:, None], params["W_enc"])  # [S, B, F]
    f = torch.relu(pre)  # [S, B, F]
    x_hat = torch.baddbmm(params["b_dec"][:, None], f, params["W_dec"])  # [S, B, D]
    mse = (x_hat - x).square().sum(-1).mean(-1)  # [S]
    return mse + l1 * f.sum(-1).mean(-1)  # [S]


def _prepare(x, d_sae, params, scales, l1, seed, device):
    """Data on ``device`` (a view of the input on the CPU), the init (default or given), the [S] scales and
    the [S] L1 coefficients."""
    x_host = np.ascontiguousarray(x, np.float32)  # [S, N, D]
    n_sae, _, d_in = x_host.shape
    params = init_params(n_sae, d_in, d_sae, seed) if params is None else params
    scales = rms_scales(x_host) if scales is None else np.asarray(scales, np.float32)
    l1 = torch.as_tensor(np.broadcast_to(np.asarray(l1, np.float32), (n_sae,)).copy())  # [S]
    return torch.from_numpy(x_host).to(device), params, torch.from_numpy(scales).to(device), l1.to(device)


def _batch(x: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    n_batches = x.shape[-2] // batch_size
    if n_batches == 0:
        raise ValueError(f"{x.shape[-2]} rows per SAE are fewer than batch_size={batch_size}")
    start = (step % n_batches) * batch_size
    return x[..., start:start + batch_size, :]  # [..., B, D] view


def _leaf_params(params: dict[str, np.ndarray], index, device: torch.device) -> dict[str, torch.Tensor]:
    """Trainable float32 copies of ``params[name][index]`` (the caller's arrays are never modified)."""
    return {k: torch.tensor(np.asarray(params[k])[index], dtype=torch.float32, device=device, requires_grad=True)
            for k in PARAM_NAMES}


@torch.no_grad()
def _unit_decoder_rows(w_dec: torch.Tensor) -> None:
    w_dec.div_(w_dec.norm(dim=-1, keepdim=True))


@torch.no_grad()
def _remove_parallel_grad(w_dec: torch.Tensor) -> None:
    """Drops each decoder row's gradient component along the row (SAELens'
    ``remove_gradient_parallel_to_decoder_directions``): with rows renormalised after the step it would only
    change their norm."""
    along = (w_dec.grad * w_dec).sum(-1, keepdim=True) / (w_dec * w_dec).sum(-1, keepdim=True)  # [..., F, 1]
    w_dec.grad.sub_(along * w_dec)


def _adam(params: dict[str, torch.Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    return torch.optim.Adam(list(params.values()), lr=lr, betas=betas, eps=1e-8, fused=True)


def _fit(loss_fn: Callable[[int], torch.Tensor], opt: torch.optim.Optimizer, w_dec: torch.Tensor,
         steps: int, remove_parallel: bool) -> tuple[np.ndarray, float]:
    """``steps`` Adam steps on ``loss_fn(step) -> [S]``, renormalising ``w_dec`` (and first dropping its
    row-parallel gradient with ``remove_parallel``): (losses [steps, S], seconds)."""
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        per_sae = loss_fn(step)  # [S]
        opt.zero_grad(set_to_none=True)
        per_sae.sum().backward()  # independent SAEs: each gets exactly the gradient of its own loss
        if remove_parallel:
            _remove_parallel_grad(w_dec)
        opt.step()
        _unit_decoder_rows(w_dec)
        losses.append(per_sae.detach())
    if w_dec.device.type == "cuda":
        torch.cuda.synchronize()  # the steps above were only queued
    seconds = time.perf_counter() - t0
    return torch.stack(losses).cpu().numpy(), seconds


def _train_stack(x, params, index: slice, scales, l1, steps: int, batch_size: int, lr: float, betas,
                 remove_parallel: bool):
    """Trains the SAEs ``index`` of the stack together: (trained params [S', ...], losses [steps, S'], seconds)."""
    p = _leaf_params(params, index, x.device)
    xs, inv, l1s = x[index], (1.0 / scales[index])[:, None, None], l1[index]  # [S', N, D], [S', 1, 1], [S']
    opt = _adam(p, lr, betas)
    # Each batch is scaled as it is read, so no scaled copy of the whole data set is ever made.
    losses, seconds = _fit(lambda t: sae_loss(p, _batch(xs, t, batch_size) * inv, l1s), opt, p["W_dec"], steps,
                           remove_parallel)
    return {k: v.detach().cpu().numpy() for k, v in p.items()}, losses, seconds


def train_saes_bmm(
    x: np.ndarray, d_sae: int, *, steps: int, batch_size: int = 512, l1: float | Sequence[float] = 0.15,
    lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), params: dict[str, np.ndarray] | None = None,
    scales: np.ndarray | None = None, seed: int = 0, threads: int | None = None, device: str = "cpu",
    remove_parallel_grad: bool = False,
) -> TrainedSAEs:
    """All S SAEs in one batched step (`torch.baddbmm`) with one Adam over the stacked parameters.

    Adam is elementwise, so one optimizer over stacked tensors takes exactly the steps S separate ones would.
    """
    set_threads(threads)
    x, params, scales, l1 = _prepare(x, d_sae, params, scales, l1, seed, device)
    trained, losses, seconds = _train_stack(x, params, slice(None), scales, l1, steps, batch_size, lr, betas,
                                            remove_parallel_grad)
    return TrainedSAEs(trained, scales.cpu().numpy(), losses.T, seconds)


def train_saes_loop(
    x: np.ndarray, d_sae: int, *, steps: int, batch_size: int = 512, l1: float | Sequence[float] = 0.15,
    lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), params: dict[str, np.ndarray] | None = None,
    scales: np.ndarray | None = None, seed: int = 0, threads: int | None = None, device: str = "cpu",
    remove_parallel_grad: bool = False,
) -> TrainedSAEs:
    """One SAE after another, each with its own Adam: the plain training loop, run S times.

    Each SAE keeps a unit SAE axis so it runs the same `sae_loss` (a batch of one `baddbmm` is one GEMM).
    """
    set_threads(threads)
    x, params, scales, l1 = _prepare(x, d_sae, params, scales, l1, seed, device)
    runs = [_train_stack(x, params, slice(s, s + 1), scales, l1, steps, batch_size, lr, betas, remove_parallel_grad)
            for s in range(x.shape[0])]
    trained = {k: np.concatenate([r[0][k] for r in runs]) for k in PARAM_NAMES}
    losses = np.concatenate([r[1] for r in runs], axis=1)  # [steps, S]
    return TrainedSAEs(trained, scales.cpu().numpy(), losses.T, sum(r[2] for r in runs))


def train_saes_saelens(
    x: np.ndarray, d_sae: int, *, steps: int, batch_size: int = 512, l1: float | Sequence[float] = 0.15,
    lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), params: dict[str, np.ndarray] | None = None,
    scales: np.ndarray | None = None, seed: int = 0, threads: int | None = None, device: str = "cpu",
) -> TrainedSAEs:
    """SAELens 6.x `StandardTrainingSAE` trained by its own `SAETrainer`, one SAE after another.

    `SAETrainer.step(batch)` is SAELens' public per-step API (what its `fit()` and `MultiSAETrainer` call):
    forward + loss via `training_forward_pass`, backward, gradient-norm clipping at 1.0 (hard-coded in
    SAELens), Adam, LR and coefficient schedulers. We feed it our batches already divided by the RMS scale
    (``normalize_activations="none"``) and advance ``n_training_steps`` as `fit()` does. Differences from
    the other two variants are SAELens' own: its L1 is weighted by the decoder row norms and it does not
    renormalise decoder rows, plus the clipping. From unit-norm rows, the first step's loss is identical.
    """
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if device != "cpu":
        raise ValueError("train_saes_saelens runs on the CPU only (its trainer's device handling is not wired here)")
    set_threads(threads)
    x, params, scales, l1 = _prepare(x, d_sae, params, scales, l1, seed, device)
    n_sae, _, d_in = x.shape
    out = {k: [] for k in PARAM_NAMES}
    losses, seconds = np.zeros((n_sae, steps), np.float32), 0.0
    for s in range(n_sae):
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=float(l1[s]),
                                                            normalize_activations="none"))
        with torch.no_grad():
            for k in PARAM_NAMES:
                getattr(sae, k).copy_(torch.from_numpy(np.asarray(params[k][s])))
        cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                               lr=lr, lr_end=lr, adam_beta1=betas[0], adam_beta2=betas[1])
        trainer = SAETrainer(cfg, sae, data_provider=iter(()))  # batches come from us, not a provider
        inv = 1.0 / scales[s]
        t0 = time.perf_counter()
        for t in range(steps):
            losses[s, t] = trainer.step(_batch(x[s], t, batch_size) * inv).loss.item()
            trainer.n_training_steps += 1
        seconds += time.perf_counter() - t0
        for k in PARAM_NAMES:
            out[k].append(getattr(sae, k).detach().numpy().copy())
    return TrainedSAEs({k: np.stack(v) for k, v in out.items()}, scales.numpy(), losses, seconds)
