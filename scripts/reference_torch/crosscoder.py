"""A straightforward PyTorch BatchTopK crosscoder trainer, one crosscoder at a time (as the diffing toolkit /
crosscoder_learning train theirs), with lgeo_jax's conventions so the two can be compared on the same data.

Math (lgeo_jax/crosscoder/_models.py): input ``x = [h_base; h_adapted] / s`` (``[B, 2D]``, one RMS scale s);
``f = relu(x W_enc + b_enc)``; BatchTopK keeps the ``k * B`` largest ``f_j (||d_j^base|| + ||d_j^adapted||)`` of
the batch; ``x_hat = f W_dec + b_dec``; ``loss = mean_t sum (x_hat - x)^2 + auxk_coeff * AuxK`` where AuxK (SAELens'
form) lets the top ``2D // 2`` dead latents' pre-activations reconstruct the detached residual, scaled by
``min(n_dead / (2D // 2), 1)``; a latent is dead after ``dead_steps`` steps without firing. Adam; the inference
threshold follows the smallest kept weighted activation (moving average, rate ``threshold_lr``).
Step t reads the contiguous batch ``t mod (N // batch_size)``. Never imports lgeo_jax.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._threads import set_threads


def _auxk(pre, x, x_hat, w_dec, dead):
    e, f = x.shape[-1], pre.shape[-1]
    k_aux = e // 2
    n_dead = dead.sum()
    if n_dead == 0:
        return torch.zeros((), dtype=x.dtype)
    values, idx = torch.topk(torch.where(dead, pre, torch.full_like(pre, -torch.inf)), min(k_aux, f), dim=-1)
    values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    acts = torch.zeros_like(pre).scatter(-1, idx, values)
    recon = acts @ w_dec
    residual = (x - x_hat).detach()
    return torch.clamp(n_dead / k_aux, max=1.0) * (recon - residual).square().sum(-1).mean()


def train_crosscoder(x: np.ndarray, params: dict[str, np.ndarray], scale: float, *, k: int, steps: int,
                     batch_size: int, lr: float, auxk_coeff: float, threshold_lr: float, dead_steps: int,
                     threads: int | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Trains one crosscoder on ``x [N, 2D]`` (original units) from ``params``; returns (params, seconds)."""
    set_threads(threads)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    p = {n: torch.tensor(v, requires_grad=n != "threshold") for n, v in params.items()}
    opt = torch.optim.Adam([p[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")], lr=lr)
    since = torch.zeros(p["b_enc"].shape[0], dtype=torch.int64)
    n_batches = xt.shape[0] // batch_size
    t0 = time.perf_counter()
    for step in range(steps):
        i = step % n_batches
        xb = xt[i * batch_size:(i + 1) * batch_size] / scale  # [B, 2D]
        pre = xb @ p["W_enc"] + p["b_enc"]  # [B, F]
        d = p["W_dec"].shape[1] // 2
        weight = p["W_dec"].reshape(-1, 2, d).norm(dim=-1).sum(-1)  # [F]
        f = torch.relu(pre)
        scored = (f * weight).flatten()
        keep = torch.zeros_like(scored, dtype=torch.bool)
        keep[torch.topk(scored, k * xb.shape[0]).indices] = True
        f = torch.where(keep.reshape(f.shape) & (f > 0), f, torch.zeros_like(f))
        x_hat = f @ p["W_dec"] + p["b_dec"]
        loss = (x_hat - xb).square().sum(-1).mean()
        dead = since >= dead_steps
        if dead.any():
            loss = loss + auxk_coeff * _auxk(pre, xb, x_hat, p["W_dec"], dead)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            active = f > 0
            if active.any():
                smallest = (f * weight)[active].min()
                p["threshold"].mul_(1 - threshold_lr).add_(threshold_lr * smallest)
            since = torch.where(active.any(0), torch.zeros_like(since), since + 1)
    seconds = time.perf_counter() - t0
    return {n: v.detach().numpy().copy() for n, v in p.items()}, seconds
