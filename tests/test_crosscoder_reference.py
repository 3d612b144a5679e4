"""The one-at-a-time PyTorch crosscoder trainer (scripts/reference_torch/crosscoder.py, the benchmark's peer)
takes the same steps as lgeo_jax's from identical weights on the same batches: a benchmark between two
trainers is only meaningful if they train the same thing."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgeo_jax.crosscoder import CrosscoderConfig, init_params
from lgeo_jax.crosscoder._models import CrossState, make_optimizer, train_step

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))

from reference_torch.crosscoder import train_crosscoder


@pytest.mark.parametrize("steps", [1, 4])
def test_torch_reference_takes_the_same_steps(steps):
    rng = np.random.default_rng(0)
    d, batch = 12, 64
    base = rng.normal(size=(batch * steps, d)).astype(np.float32)
    x = np.concatenate([base, base + 0.3 * rng.normal(size=base.shape).astype(np.float32)], axis=1)
    # dead window of 1 step: AuxK is on from the second step, so its pass is compared too
    cfg = CrosscoderConfig(width=96, k=1, lr=1e-3, batch_size=batch, steps=10, dead_window_fraction=0.1)
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(3), d, cfg).items()}
    params["b_dec"] = x.mean(axis=0) / 1.3
    opt = make_optimizer(cfg)
    state = CrossState({k: jnp.asarray(v) for k, v in params.items()}, opt.init(params),
                       jnp.zeros(cfg.width, jnp.int32), jnp.asarray(1.3, jnp.float32))
    auxk_used = []
    for i in range(steps):
        any_dead = bool(jnp.any(state.steps_since_fired >= cfg.dead_window_steps()))
        auxk_used.append(any_dead)
        state, _ = train_step(state, jnp.asarray(x[i * batch:(i + 1) * batch]), cfg, opt, with_auxk=any_dead)
    ref, _ = train_crosscoder(x, params, 1.3, k=cfg.k, steps=steps, batch_size=batch, lr=cfg.lr,
                              auxk_coeff=cfg.auxk_coeff, threshold_lr=cfg.threshold_lr,
                              dead_steps=cfg.dead_window_steps(), threads=1)
    assert any(auxk_used) == (steps > 1)
    for name, want in ref.items():
        got = np.asarray(state.params[name])
        np.testing.assert_allclose(got, want, atol=2e-5 * max(np.abs(want).max(), 1e-3), rtol=0, err_msg=name)
