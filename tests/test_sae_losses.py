"""Training losses against SAELens (its own training SAEs, float64) and numpy: the loss on a fixed batch and its
gradients for ReLU, TopK and BatchTopK (with AuxK) and JumpReLU; the decoder projection and the other per-step
updates (JumpReLU threshold >= 0, BatchTopK's running threshold, dead-latent counts, resampling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from lgeo_jax.sae import SAEConfig, SAETrainConfig, init_params
from lgeo_jax.sae._losses import training_loss
from lgeo_jax.sae._step import SAEState, loss_and_grads, make_optimizer, remove_parallel, resample_dead, train_step

D, F, B = 23, 61, 37  # primes, so a transposed axis cannot pass for the right one


def random_params(seed: int, unit_rows: bool, threshold: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    w_dec = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True) if unit_rows else w_dec * rng.uniform(0.3, 2, (F, 1))
    p = {"W_enc": rng.normal(size=(D, F)) / np.sqrt(D), "b_enc": rng.normal(size=F) * 0.2, "W_dec": w_dec,
         "b_dec": rng.normal(size=D) * 0.3}
    if threshold:
        p["threshold"] = rng.uniform(0.05, 0.6, F)
    return p


def batch(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, D)) * 1.3


def dead_mask(n_dead: int, seed: int = 2) -> np.ndarray:
    mask = np.zeros(F, bool)
    mask[np.random.default_rng(seed).choice(F, n_dead, replace=False)] = True
    return mask


def lens_loss_and_grads(sae, params: dict, x: np.ndarray, dead: np.ndarray, coefficients: dict):
    """SAELens' training loss and gradients (float64), with the parallel decoder-gradient part removed as its
    unit-norm trainer did (``remove_gradient_parallel_to_decoder_directions``)."""
    with torch.no_grad():
        for name, value in params.items():
            getattr(sae, name).data = torch.tensor(value, dtype=torch.float64)
    out = sae.training_forward_pass(TrainStepInput(sae_in=torch.tensor(x, dtype=torch.float64),
                                                   coefficients=coefficients,
                                                   dead_neuron_mask=torch.tensor(dead), n_training_steps=0,
                                                   is_logging_step=False))
    out.loss.backward()
    grads = {name: getattr(sae, name).grad.numpy() for name in params}
    w = params["W_dec"]
    grads["W_dec"] = grads["W_dec"] - (np.sum(grads["W_dec"] * w, 1) / np.sum(w * w, 1))[:, None] * w
    return out.loss.item(), grads


def ours_loss_and_grads(params: dict, x: np.ndarray, dead: np.ndarray, train_cfg: SAETrainConfig, l1: float = 0.0):
    sae_cfg = train_cfg.sae_config(D)
    loss, _, grads = loss_and_grads({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                                    jnp.asarray(x, jnp.float32), jnp.float32(l1), jnp.asarray(dead), sae_cfg,
                                    train_cfg)
    return float(loss), {k: np.asarray(v, np.float64) for k, v in grads.items()}


def assert_match(ours, lens):
    (loss, grads), (ref_loss, ref_grads) = ours, lens
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name, ref in ref_grads.items():
        scale = max(np.abs(ref).max(), 1e-12)
        err = np.abs(grads[name] - ref).max() / scale
        assert err < 1e-4, f"gradient of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("n_dead", [0, 4, 30])  # no AuxK; fewer dead than d // 2 (k_aux shrinks); more
@pytest.mark.parametrize("unit_rows", [True, False])
def test_topk_loss_equals_saelens(n_dead, unit_rows):
    """TopK + AuxK. Our trainer holds decoder rows at unit norm, where SAELens' default
    `rescale_acts_by_decoder_norm` changes nothing; with free norms we match it switched off."""
    params, x, dead = random_params(0, unit_rows), batch(), dead_mask(n_dead)
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=5, aux_loss_coefficient=0.7, dtype="float64",
                                                 rescale_acts_by_decoder_norm=unit_rows))
    tc = SAETrainConfig(architecture="topk", k=5, auxk_coeff=0.7, width=F)
    ours = ours_loss_and_grads(params, x, dead, tc)
    assert_match(ours, lens_loss_and_grads(lens, params, x, dead, {}))
    if n_dead:  # the AuxK term is really there: without it the loss differs
        no_aux = ours_loss_and_grads(params, x, np.zeros(F, bool), tc)[0]
        assert abs(no_aux - ours[0]) > 1e-3 * abs(ours[0])


@pytest.mark.parametrize("n_dead", [0, 4, 30])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_batchtopk_loss_equals_saelens(n_dead, unit_rows):
    params, x, dead = random_params(3, unit_rows), batch(4), dead_mask(n_dead, 5)
    lens = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=4, aux_loss_coefficient=1.3,
                                                           dtype="float64", rescale_acts_by_decoder_norm=unit_rows))
    tc = SAETrainConfig(architecture="batchtopk", k=4, auxk_coeff=1.3, width=F)
    assert_match(ours_loss_and_grads(params, x, dead, tc), lens_loss_and_grads(lens, params, x, dead, {}))


@pytest.mark.parametrize("bandwidth", [0.05, 0.4])  # narrow (few tokens in the kernel) and wide
def test_jumprelu_loss_and_threshold_gradient_equal_saelens(bandwidth):
    """JumpReLU with the straight-through threshold gradient and the "step" L0 penalty (SAELens defaults;
    Gemma Scope's form: b_dec not subtracted, i.e. SAELens' apply_b_dec_to_input=False)."""
    params, x = random_params(6, unit_rows=True, threshold=True), batch(7)
    lens = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=F, jumprelu_bandwidth=bandwidth,
                                                         l0_coefficient=0.8, apply_b_dec_to_input=False,
                                                         dtype="float64"))
    tc = SAETrainConfig(architecture="jumprelu", l0_coeff=0.8, jumprelu_bandwidth=bandwidth, width=F)
    ours = ours_loss_and_grads(params, x, np.zeros(F, bool), tc)
    assert_match(ours, lens_loss_and_grads(lens, params, x, np.zeros(F, bool), {"l0": 0.8}))
    assert np.abs(ours[1]["threshold"]).max() > 0  # the estimator reached the threshold (else the test is empty)


@pytest.mark.parametrize("unit_rows", [True, False])
def test_relu_loss_equals_saelens_standard(unit_rows):
    """ReLU + L1: SAELens' "standard" SAE weights the L1 by ||W_dec_i|| (our `decoder_norm`); with unit rows
    that is our default `unit_decoder` penalty, and the weight's gradient lies along the rows (removed)."""
    params, x = random_params(8, unit_rows), batch(9)
    lens = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D, d_sae=F, l1_coefficient=0.3, dtype="float64"))
    sparsity = "unit_decoder" if unit_rows else "decoder_norm"
    tc = SAETrainConfig(width=F, sparsity=sparsity)
    ours = ours_loss_and_grads(params, x, np.zeros(F, bool), tc, l1=0.3)
    ref = lens_loss_and_grads(lens, params, x, np.zeros(F, bool), {"l1": 0.3})
    if not unit_rows:  # a free decoder keeps its whole gradient (no projection)
        ref = (ref[0], {**ref[1], "W_dec": torch_decoder_grad(lens)})
    assert_match(ours, ref)


def torch_decoder_grad(sae) -> np.ndarray:
    return sae.W_dec.grad.numpy()


@pytest.mark.parametrize("sparsity", ["unit_decoder", "decoder_norm"])
def test_relu_loss_convention_matches_numpy(sparsity):
    """MSE summed over d and averaged over tokens; L1 = mean over tokens of sum_i f_i (x ||W_dec_i|| if weighted)."""
    cfg, tc = SAEConfig(11, 17), SAETrainConfig(width=17, sparsity=sparsity)
    rng = np.random.default_rng(5)
    p = {"W_enc": rng.normal(size=(11, 17)), "b_enc": rng.normal(size=17) * 0.1,
         "W_dec": rng.normal(size=(17, 11)) * 2, "b_dec": rng.normal(size=11)}
    x = rng.normal(size=(13, 11))
    loss, aux = training_loss({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32),
                              jnp.float32(0.3), jnp.zeros(17, bool), cfg, tc)
    f = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    mse = np.mean(np.sum((f @ p["W_dec"] + p["b_dec"] - x) ** 2, axis=1))
    weights = np.linalg.norm(p["W_dec"], axis=1) if sparsity == "decoder_norm" else np.ones(17)
    pen = np.mean(f @ weights)
    assert float(aux["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(aux["penalty"]) == pytest.approx(pen, rel=1e-5)
    assert float(loss) == pytest.approx(mse + 0.3 * pen, rel=1e-5)
    assert float(aux["l0"]) == pytest.approx(np.mean(np.sum(f > 0, axis=1)))


def test_remove_parallel_leaves_only_the_perpendicular_part():
    rng = np.random.default_rng(0)
    g, w = rng.normal(size=(F, D)), rng.normal(size=(F, D)) * rng.uniform(0.5, 2, (F, 1))
    out = np.asarray(remove_parallel(jnp.asarray(g), jnp.asarray(w)), np.float64)
    np.testing.assert_allclose(np.sum(out * w, axis=1), 0, atol=1e-5)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(out, g - np.sum(g * unit, axis=1, keepdims=True) * unit, rtol=1e-5, atol=1e-5)


def _state(params: dict, tc: SAETrainConfig, total: int = 5):
    opt = make_optimizer(tc, total)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return SAEState(params, opt.init(params), jnp.zeros(F, jnp.int32), jnp.float32(1.0)), opt


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_step_keeps_unit_rows_and_updates_thresholds(arch):
    kw = {"relu": {}, "topk": {"k": 5}, "batchtopk": {"k": 5}, "jumprelu": {}}[arch]
    tc = SAETrainConfig(architecture=arch, width=F, lr=0.05, steps=5, **kw)
    params = random_params(10, unit_rows=True, threshold=arch in ("batchtopk", "jumprelu"))
    if arch == "jumprelu":
        params["threshold"][:5] = 0.01  # lr 0.05 steps push some of these below 0: they must be projected back
    state, opt = _state(params, tc)
    x = jnp.asarray(batch(11), jnp.float32)
    before = np.asarray(state.params["threshold"]) if "threshold" in params else None
    new, metrics = train_step(state, x, jnp.float32(0.1 if arch == "relu" else 0.0), jnp.int32(0), tc.sae_config(D),
                              tc, opt, dead_steps=3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new.params["W_dec"]), axis=1), 1.0, rtol=1e-5)
    if arch == "jumprelu":
        assert (np.asarray(new.params["threshold"]) >= 0).all()
    if arch == "batchtopk":  # SAELens' update: an EMA (rate 0.01) of the smallest kept activation of the batch
        p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
        pre = (np.asarray(x, np.float64) - p64["b_dec"]) @ p64["W_enc"] + p64["b_enc"]
        kept = np.sort(np.maximum(pre, 0).ravel())[-5 * B:]
        want = 0.99 * before + 0.01 * kept[kept > 0].min()
        np.testing.assert_allclose(np.asarray(new.params["threshold"]), want, rtol=1e-5)
        assert float(metrics["l0"]) == pytest.approx(5.0)


def test_dead_latent_tracking():
    """A latent that cannot fire counts up its silent steps; the others reset."""
    tc = SAETrainConfig(width=F, steps=5, lr=1e-2)
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), SAEConfig(D, F)).items()}
    params["b_enc"] = params["b_enc"].copy()
    params["b_enc"][7] = -1e6
    state, opt = _state(params, tc)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, D)), jnp.float32)
    for step in range(5):
        state, _ = train_step(state, x, jnp.float32(0.01), jnp.int32(step), SAEConfig(D, F), tc, opt, dead_steps=3)
    since = np.asarray(state.steps_since_fired)
    assert since[7] == 5 and (np.delete(since, 7) == 0).all()


def test_resample_dead_reinitialises_only_dead_latents():
    tc = SAETrainConfig(width=F, steps=5, lr=1e-2, resample_dead=True)
    cfg = SAEConfig(D, F)
    params = random_params(12, unit_rows=True)
    state, opt = _state(params, tc)
    x = jnp.asarray(batch(13), jnp.float32)
    state, _ = train_step(state, x, jnp.float32(0.1), jnp.int32(0), cfg, tc, opt, dead_steps=1)  # nonzero moments
    dead = np.zeros(F, bool)
    dead[[3, 17, 40]] = True
    state = SAEState(state.params, state.opt_state, jnp.where(jnp.asarray(dead), 9, 0), state.scale)
    new = resample_dead(state, x, jax.random.key(0), cfg, dead_steps=5)
    old_p, new_p = ({k: np.asarray(v, np.float64) for k, v in s.params.items()} for s in (state, new))
    for name in ("W_dec", "b_enc"):  # live latents untouched
        np.testing.assert_array_equal(new_p[name][~dead], old_p[name][~dead])
    np.testing.assert_array_equal(new_p["W_enc"][:, ~dead], old_p["W_enc"][:, ~dead])
    # each dead decoder row is the unit direction of some batch input minus b_dec
    dirs = np.asarray(x, np.float64) - old_p["b_dec"]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    assert np.allclose((new_p["W_dec"][dead] @ dirs.T).max(axis=1), 1.0, atol=1e-5)
    live_norm = np.linalg.norm(old_p["W_enc"][:, ~dead], axis=0).mean()
    np.testing.assert_allclose(np.linalg.norm(new_p["W_enc"][:, dead], axis=0), 0.2 * live_norm, rtol=1e-5)
    assert (new_p["b_enc"][dead] == 0).all() and (np.asarray(new.steps_since_fired) == 0).all()
    adam = new.opt_state[0]
    for moments in (adam.mu, adam.nu):
        assert (np.asarray(moments["W_dec"])[dead] == 0).all() and (np.asarray(moments["b_enc"])[dead] == 0).all()
        assert (np.asarray(moments["W_dec"])[~dead] != 0).any()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_is_skipped_only_when_it_is_exactly_zero(arch):
    """The trainer leaves the AuxK pass out while no latent is dead: the step equals the full one then; once a
    latent is dead it runs (and changes the step)."""
    import functools

    from lgeo_jax.sae._train import _multi_step

    tc = SAETrainConfig(architecture=arch, k=5, width=F, lr=0.01, steps=5)
    cfg, opt = tc.sae_config(D), make_optimizer(tc, 5)
    one, _ = _state(random_params(14, unit_rows=True, threshold=arch == "batchtopk"), tc)
    x = jnp.asarray(batch(15), jnp.float32)[None]
    args = (jnp.zeros(1, jnp.float32), jnp.int32(0))

    def stacked(since):
        return jax.tree.map(lambda a: a[None], SAEState(one.params, one.opt_state, since, one.scale))

    full = jax.vmap(functools.partial(train_step, sae_cfg=cfg, train_cfg=tc, optimizer=opt, dead_steps=3,
                                      with_auxk=True), in_axes=(0, 0, 0, None))
    for since, expect_aux in ((jnp.zeros(F, jnp.int32), False), (jnp.where(jnp.arange(F) < 20, 9, 0), True)):
        ours, metrics = _multi_step(stacked(since), x, *args, sae_cfg=cfg, train_cfg=tc, optimizer=opt, dead_steps=3)
        ref, ref_metrics = full(stacked(since), x, *args)
        for name in ref.params:
            np.testing.assert_allclose(np.asarray(ours.params[name]), np.asarray(ref.params[name]), rtol=1e-6,
                                       atol=1e-7)
        assert (float(metrics["penalty"][0]) > 0) == expect_aux
        assert float(metrics["loss"][0]) == pytest.approx(float(ref_metrics["loss"][0]), rel=1e-6)
