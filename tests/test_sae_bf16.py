"""`sae.matmul_dtype: bfloat16`: the training matmuls on bf16-rounded operands with float32 accumulation (forward and
both gradients), float32 everywhere else; it still trains, and close to the float32 run."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from sae_helpers import P_ACTIVE, D, M, max_cos_to_truth, one_device, planted, quiet_train

from lgeo_jax.config import ConfigError, DType
from lgeo_jax.sae import ArraySource, SAETrainConfig, init_params
from lgeo_jax.sae._models import matmul
from lgeo_jax.sae._step import loss_and_grads


def _bf16(a):
    """numpy float64 of the bf16 rounding (round to nearest even, as XLA's convert)."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_matmul_and_its_gradients_equal_float64_products_of_rounded_operands():
    rng = np.random.default_rng(0)
    x, w, c = (rng.normal(size=s).astype(np.float32) for s in ((37, 29), (29, 41), (37, 41)))
    f = lambda x, w: jnp.sum(matmul(x, w, "bfloat16") * c)  # output gradient g = c
    y = np.asarray(matmul(jnp.asarray(x), jnp.asarray(w), "bfloat16"))
    dx, dw = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w)))
    assert y.dtype == dx.dtype == dw.dtype == np.float32  # float32 out, float32 gradients for float32 weights
    # float32 accumulation of exact bf16 x bf16 products: float32 rounding of the float64 sums
    np.testing.assert_allclose(y, _bf16(x) @ _bf16(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, _bf16(c) @ _bf16(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, _bf16(x).T @ _bf16(c), rtol=1e-5, atol=1e-5)
    # and the rounding is really there: the float32 product differs from it by bf16-sized errors
    exact = x.astype(np.float64) @ w
    assert np.abs(y - exact).max() > 1e-3 * np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), jnp.asarray(w))), exact, rtol=1e-5, atol=1e-4)


def test_bf16_step_gradients_are_close_to_float32_and_the_rest_stays_float32():
    tc32 = SAETrainConfig(width=96, steps=10, l1=0.5)
    tc16 = SAETrainConfig(width=96, steps=10, l1=0.5, matmul_dtype="bfloat16")
    cfg = tc32.sae_config(D)
    params = init_params(jax.random.key(0), cfg)
    _, x = planted(256, seed=3)
    dead = jnp.zeros(cfg.d_sae, bool)
    loss32, _, g32 = loss_and_grads(params, jnp.asarray(x), 0.5, dead, cfg, tc32)
    loss16, _, g16 = loss_and_grads(params, jnp.asarray(x), 0.5, dead, cfg, tc16)
    for name in params:
        assert g16[name].dtype == jnp.float32
        err = float(jnp.linalg.norm(g16[name] - g32[name]) / jnp.linalg.norm(g32[name]))
        assert 0 < err < 3e-2, (name, err)  # bf16 keeps 8 bits: relative errors of ~2^-8 per product
    assert 0 < abs(float(loss16 - loss32)) < 1e-2 * float(loss32)
    hlo = jax.jit(lambda p: loss_and_grads(p, jnp.asarray(x), 0.5, dead, cfg, tc16)).lower(params).as_text()
    assert "bf16" in hlo  # the option reaches the compiled step
    assert "bf16" not in jax.jit(lambda p: loss_and_grads(p, jnp.asarray(x), 0.5, dead, cfg, tc32)).lower(
        params).as_text()


def test_bf16_trains_the_planted_dictionary_like_float32(tmp_path):
    gt, x = planted(20000, seed=0)
    _, held = planted(2000, seed=1)
    results = {}
    for dtype in ("float32", "bfloat16"):
        tc = SAETrainConfig(width=96, batch_size=256, steps=1000, lr=3e-3, lr_warmup_steps=50, l1_warmup_steps=100,
                            log_every=250, eval_every=1000, checkpoint_every=1000, eval_rows=2000, matmul_dtype=dtype)
        results[dtype] = quiet_train(ArraySource([x], held_out=[held]), tc.sae_config(D), tc, [3.0], [0],
                                     tmp_path / dtype, mesh=one_device())
    w32, w16 = (results[k].saes[0].params["W_dec"] for k in ("float32", "bfloat16"))
    mc = max_cos_to_truth(gt, w16)
    m32, m16 = (results[k].final_metrics[0] for k in ("float32", "bfloat16"))
    row_cos = np.sum(w32 * w16, axis=1) / np.linalg.norm(w32, axis=1) / np.linalg.norm(w16, axis=1)  # [F]
    print(f"bf16: planted max-cos > 0.9 for {np.mean(mc > 0.9):.0%}; held-out L0 {m16['heldout_l0']:.2f} vs "
          f"{m32['heldout_l0']:.2f}, FVU {m16['heldout_fvu']:.4f} vs {m32['heldout_fvu']:.4f}; decoder rows' cos to "
          f"the float32 run: median {np.median(row_cos):.4f}, min {row_cos.min():.4f}")
    assert np.mean(mc > 0.9) >= 0.9 and np.median(mc) > 0.95
    assert 0.5 * P_ACTIVE * M <= m16["heldout_l0"] <= 1.5 * P_ACTIVE * M
    assert m16["heldout_fvu"] < 0.25 and abs(m16["heldout_fvu"] - m32["heldout_fvu"]) < 0.1 * m32["heldout_fvu"]
    # same init, data and order: the bf16 run's latents stay the float32 run's (random unit rows in R^32 have
    # |cos| ~ 0.14)
    assert np.median(row_cos) > 0.99


def test_matmul_dtype_config():
    assert SAETrainConfig(matmul_dtype="bfloat16").low_precision == "bfloat16"
    assert SAETrainConfig().matmul_dtype is DType.FLOAT32 and SAETrainConfig().low_precision is None
    with pytest.raises(ConfigError, match="matmul_dtype"):
        SAETrainConfig(matmul_dtype="float16")
