"""Training health: the verdict on constructed SAEs (numpy-checked), and the initial decoder it compares with."""

import jax
import numpy as np
import pytest
from sae_helpers import one_device, small_cfg, streams

from lgeo_jax.sae import SAE, SAEConfig, initial_decoder, sae_health
from lgeo_jax.sae._step import make_optimizer
from lgeo_jax.sae._train import _init_state

D, F = 16, 40


def rotated(w0: np.ndarray, moved: int, angle_deg: float, seed: int = 0) -> np.ndarray:
    """``w0`` with its first ``moved`` rows turned by ``angle_deg`` towards random perpendicular directions."""
    rng = np.random.default_rng(seed)
    w = w0.copy()
    for i in range(moved):
        r = rng.normal(size=D)
        r -= (r @ w0[i]) / (w0[i] @ w0[i]) * w0[i]
        r /= np.linalg.norm(r)
        a = np.deg2rad(angle_deg)
        w[i] = np.cos(a) * w0[i] / np.linalg.norm(w0[i]) + np.sin(a) * r
    return w


def sae_with(w_dec: np.ndarray) -> SAE:
    return SAE(SAEConfig(D, F), {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(F, np.float32), "W_dec": w_dec,
                                 "b_dec": np.zeros(D, np.float32)})


@pytest.fixture
def w0() -> np.ndarray:
    return initial_decoder(SAEConfig(D, F), 5)


def test_healthy_sae(w0):
    w = rotated(w0, moved=30, angle_deg=60)
    h = sae_health(sae_with(w), w0, {"heldout_l0": 6.0, "dead_frac": 0.1, "heldout_fvu": 0.2}, (4, 12))
    cos = np.sum(w * w0, 1) / np.linalg.norm(w, axis=1) / np.linalg.norm(w0, axis=1)
    assert h.healthy and h.problems == ()
    assert h.moved_fraction == pytest.approx(30 / F)  # cos 0.5 < 0.9 for the turned rows, 1 for the rest
    assert h.cos_to_init_median == pytest.approx(np.median(cos))
    assert (h.l0, h.dead_fraction, h.heldout_fvu) == (6.0, 0.1, 0.2)
    assert h.to_json()["healthy"] == 1


@pytest.mark.parametrize("l0,moved,angle,says", [
    (24.0, 30, 60, ["L0 24.0 >= d_in 16", "outside the target [4, 20]"]),   # a dense code, also off target
    (16.0, 30, 60, ["L0 16.0 >= d_in 16"]),                                  # on target, but as dense as d_in
    (2.0, 30, 60, ["L0 2.0 is outside the target [4, 20]"]),
    (6.0, 19, 60, ["only 48% of decoder rows moved"]),                       # just under half moved
    (6.0, 40, 20, ["only 0% of decoder rows moved"]),                        # all turned, but only by 20 deg
])
def test_unhealthy_sae_says_why(w0, l0, moved, angle, says):
    h = sae_health(sae_with(rotated(w0, moved, angle)), w0, {"heldout_l0": l0, "dead_frac": 0.0,
                                                               "heldout_fvu": 0.3}, (4, 20))
    assert not h.healthy and h.to_json()["healthy"] == 0
    assert len(h.problems) == len(says) and all(s in p for s, p in zip(says, h.problems, strict=True)), h.problems


def test_without_held_out_rows_the_training_l0_is_used(w0):
    h = sae_health(sae_with(rotated(w0, 40, 60)), w0, {"heldout_l0": None, "l0": 7.0, "dead_frac": 0.0,
                                                        "heldout_fvu": None}, (4, 20))
    assert h.l0 == 7.0 and h.heldout_fvu is None and h.healthy


def test_initial_decoder_is_the_trainers_starting_point():
    src = streams(3, d=D)
    tc = small_cfg(width=F)
    seeds = [11, 12, 13]
    with jax.default_device(one_device().devices.flat[0]):
        state = _init_state(src, tc.sae_config(D), tc, seeds, make_optimizer(tc, tc.steps))
    for i, seed in enumerate(seeds):
        np.testing.assert_array_equal(np.asarray(state.params["W_dec"][i]), initial_decoder(tc.sae_config(D), seed))
    assert not np.allclose(initial_decoder(tc.sae_config(D), 11), initial_decoder(tc.sae_config(D), 12))
