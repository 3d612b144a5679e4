"""Shared fixtures-as-functions for the SAE tests: planted sparse dictionaries, small streams, quiet training."""

import functools

import jax
import numpy as np

from lgeo_jax.sae import ArraySource, SAETrainConfig, train_saes
from lgeo_jax.sharding import make_mesh

D, M = 32, 48  # input width, ground-truth dictionary size
P_ACTIVE = 0.06  # chance a planted direction is active in a row: 2.9 of 48 on average


def planted(n: int, seed: int, p_active: float = P_ACTIVE, noise: float = 0.02):
    """Rows = sparse non-negative codes (about 3 of 48 active, exponential sizes) x unit directions + noise."""
    gt = np.random.default_rng(0).normal(size=(M, D))
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    codes = (rng.random((n, M)) < p_active) * rng.exponential(1.0, size=(n, M))
    return gt, (codes @ gt + noise * rng.normal(size=(n, D))).astype(np.float32)


quiet_train = functools.partial(train_saes, progress=False, plot=False)


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def small_cfg(**kw) -> SAETrainConfig:
    base = dict(batch_size=64, steps=6, lr=3e-3, lr_warmup_steps=2, l1_warmup_steps=3, scale_batches=2,
                log_every=2, eval_every=3, checkpoint_every=3, eval_rows=128)
    return SAETrainConfig(**{**base, **kw})


def streams(n_sae: int, rows: int = 1024, d: int = 24) -> ArraySource:
    rng = np.random.default_rng(7)
    arrays = [(rng.normal(size=(rows, d)) * (i + 1) + i).astype(np.float32) for i in range(n_sae)]
    held = [(rng.normal(size=(200, d)) * (i + 1) + i).astype(np.float32) for i in range(n_sae)]
    return ArraySource(arrays, names=[f"a{i}" for i in range(n_sae)], held_out=held, seed=3)


def max_cos_to_truth(gt: np.ndarray, w_dec: np.ndarray) -> np.ndarray:
    w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return (gt @ w.T).max(axis=1)  # [M]
