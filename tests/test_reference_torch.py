"""The PyTorch reference (scripts/reference_torch) against transformers, PEFT, SAELens, scipy and numpy float64.

The reference must be right on its own terms before anyone benchmarks against it; it never imports lgeo_jax.
"""

import copy
import pathlib
import sys

import ml_dtypes
import numpy as np
import peft
import pytest
import scipy.linalg
import scipy.special
import torch
from hf_tiny import SPECS, build_hf_model, save_hf_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))

from reference_torch import corpus, extract, geometry, numpy_geometry, sae, train_lora

SPEC = SPECS[0]  # GQA, head_dim != d_model / heads, 3 layers
ADAPTERS = {"r2_qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
            "r4_all": dict(r=4, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random tiny Gemma-2 and two PEFT adapters with random (non-zero) B factors, saved in HF format."""
    root = tmp_path_factory.mktemp("reference_torch")
    hf = build_hf_model(SPEC)
    save_hf_model(hf, root / "base")
    dirs = []
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **kw)
        peft.get_peft_model(copy.deepcopy(hf), cfg).save_pretrained(root / name)
        dirs.append(root / name)
    return hf, root / "base", dirs


def padded_batch(rng, batch=3, length=9):
    ids = rng.integers(0, SPEC.vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask


def hf_hidden_states(model, ids, mask):
    """transformers' own hidden_states (the last one with the final norm applied) as numpy."""
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def test_extraction_matches_transformers_and_peft(checkpoints):
    hf, base_dir, adapter_dirs = checkpoints
    ids, mask = padded_batch(np.random.default_rng(0))
    layers = list(range(SPEC.layers))
    h = extract.extract(base_dir, adapter_dirs, ids, layers, attention_mask=mask, batch_size=2, threads=2)
    assert h.shape == (1 + len(adapter_dirs), SPEC.layers, *ids.shape, SPEC.d_model) and h.dtype == np.float32
    last = SPEC.layers - 1
    models = [hf] + [peft.PeftModel.from_pretrained(copy.deepcopy(hf), d).eval() for d in adapter_dirs]
    for p, model in enumerate(models):
        ref = hf_hidden_states(model, ids, mask)
        for layer in layers[:-1]:
            np.testing.assert_allclose(h[p, layer], ref[layer + 1], rtol=1e-5, atol=1e-5)
        # The last block's residual is taken before the final norm; transformers' last state is its norm.
        assert np.abs(h[p, last] - ref[last + 1]).max() > 1e-2
        with torch.inference_mode():
            normed = hf.model.norm(torch.from_numpy(h[p, last])).numpy()
        np.testing.assert_allclose(normed, ref[last + 1], rtol=1e-5, atol=1e-5)
    d = extract.deltas(h)
    assert d.shape == (len(adapter_dirs), *h.shape[1:])
    assert np.all(np.abs(d).max(axis=(2, 3, 4)) > 1e-3)  # every adapter changes every layer


def test_extraction_subset_stops_early_and_matches_full(checkpoints):
    hf, base_dir, adapter_dirs = checkpoints
    ids, mask = padded_batch(np.random.default_rng(1))
    model, names = extract.load_peft_model(base_dir, adapter_dirs)
    full = extract.residuals(model, names, ids, range(SPEC.layers), attention_mask=mask)
    calls = []
    hook = extract._decoder(model).layers[SPEC.layers - 1].register_forward_hook(lambda *a: calls.append(1))
    part = extract.residuals(model, names, ids, [1, 0], attention_mask=mask, batch_size=1)
    hook.remove()
    assert not calls  # blocks after the deepest requested one never ran
    np.testing.assert_allclose(part, full[:, [1, 0]], rtol=1e-5, atol=1e-5)
    base_only = extract.residuals(hf, [], ids, [0], attention_mask=mask)
    np.testing.assert_allclose(base_only[0], full[0, [0]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="distinct block indices"):
        extract.residuals(model, names, ids, [SPEC.layers])


def test_lora_training_response_only_loss(checkpoints):
    hf, base_dir, _ = checkpoints
    rng = np.random.default_rng(2)
    ids = rng.integers(0, SPEC.vocab, (2, 2, 8))  # [N micro-batches, B, T]
    loss_mask = np.zeros_like(ids)
    loss_mask[..., 4:] = 1  # the "response" is the second half
    settings = train_lora.LoraSettings(lr=1e-2, schedule="constant", grad_accum=2, alpha_over_rank=2.0)
    runs = train_lora.train_ranks(base_dir, [2, 4], ids, loss_mask, 6, settings=settings, threads=2)
    # PEFT's init has B = 0, so step 0 is the base model's loss: the mean over the two micro-batches of
    # each one's mean cross-entropy on target tokens, recomputed here in float64.
    with torch.inference_mode():
        logits = np.stack([hf(input_ids=torch.as_tensor(b)).logits.double().numpy() for b in ids])  # [N, B, T, V]
    logp = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :, :-1], ids[:, :, 1:, None], axis=-1)[..., 0]  # [N, B, T-1]
    w = loss_mask[:, :, 1:]
    base_loss = np.mean((nll * w).sum((1, 2)) / w.sum((1, 2)))
    for run in runs:
        assert run.losses.shape == run.step_seconds.shape == (6,)
        np.testing.assert_allclose(run.losses[0], base_loss, rtol=1e-5)
        assert run.losses[-1] < run.losses[0] - 0.1  # it learns (same two batches every step)
        trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
    times = train_lora.time_lora_steps(base_dir, [2], ids, loss_mask, 2, settings=settings, threads=2)
    assert set(times) == {2} and times[2] > 0

    # init_dirs: a run starts from the given adapter (here run 0's trained one), so its first loss is the
    # loss of those factors, not the base model's.
    start = pathlib.Path(base_dir).parent / "trained_r2"
    runs[0].model.save_pretrained(start)
    again = train_lora.train_ranks(base_dir, [2], ids, loss_mask, 1, settings=settings, init_dirs=[start], threads=2)
    runs[0].model.eval()
    with torch.inference_mode():
        trained_loss = np.mean([runs[0].model(**b).loss.item() for b in train_lora.make_batches(ids, loss_mask)])
    np.testing.assert_allclose(again[0].losses[0], trained_loss, rtol=1e-5)
    assert trained_loss < runs[0].losses[0] - 0.1
    with pytest.raises(ValueError, match="init_dirs"):
        train_lora.train_ranks(base_dir, [2, 4], ids, loss_mask, 1, settings=settings, init_dirs=[start])


def _step_reference(params, x, scale, l1, lr):
    """One training step of one SAE in numpy float64 with hand-written gradients: (loss, params after).

    Adam's first step moves each parameter by lr * g / (|g| + eps), i.e. lr * sign(g) where |g| >> eps.
    """
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = x.astype(np.float64) / scale  # [B, D]
    n = x.shape[0]
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # [B, F]
    f = np.maximum(pre, 0.0)
    err = f @ p["W_dec"] + p["b_dec"] - x  # [B, D]
    loss = np.mean(np.sum(err**2, -1)) + l1 * np.mean(np.sum(f, -1))
    d_out = 2.0 * err / n  # [B, D]
    d_pre = (d_out @ p["W_dec"].T + l1 / n) * (pre > 0)  # [B, F]
    grads = {"W_dec": f.T @ d_out, "W_enc": (x - p["b_dec"]).T @ d_pre, "b_enc": d_pre.sum(0),
             "b_dec": d_out.sum(0) - d_pre.sum(0) @ p["W_enc"].T}
    new = {k: p[k] - lr * grads[k] / (np.abs(grads[k]) + 1e-8) for k in p}
    new["W_dec"] /= np.linalg.norm(new["W_dec"], axis=-1, keepdims=True)
    return loss, new, grads


def test_sae_step_matches_float64_reference_and_variants_agree():
    rng = np.random.default_rng(3)
    n_sae, d, f, batch = 3, 24, 40, 64
    x = (rng.normal(size=(n_sae, 4 * batch, d)) * 3 + 1).astype(np.float32)
    params = sae.init_params(n_sae, d, f, seed=1)
    params["b_dec"] = rng.normal(size=(n_sae, d)).astype(np.float32) * 0.1
    l1 = [0.1, 0.2, 0.3]
    one = sae.train_saes_bmm(x, f, steps=1, batch_size=batch, l1=l1, lr=1e-3, params=params, threads=2)
    scales = np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, -1), -1) / d)
    np.testing.assert_allclose(one.scales, scales, rtol=1e-6)
    for s in range(n_sae):
        loss, new, grads = _step_reference({k: v[s] for k, v in params.items()}, x[s, :batch], scales[s], l1[s], 1e-3)
        np.testing.assert_allclose(one.losses[s, 0], loss, rtol=1e-5)
        for k in sae.PARAM_NAMES:
            clear = np.abs(grads[k]) > 1e-3  # elements where sign(g) is not float32 noise
            assert clear.mean() > 0.5
            np.testing.assert_allclose(one.params[k][s][clear], new[k][clear], atol=2e-6, err_msg=k)

    # Dropping the decoder gradient's row-parallel part: Adam's first step follows the sign of what is left.
    perp = sae.train_saes_bmm(x, f, steps=1, batch_size=batch, l1=l1, lr=1e-3, params=params, threads=2,
                              remove_parallel_grad=True)
    for s in range(n_sae):
        _, _, grads = _step_reference({k: v[s] for k, v in params.items()}, x[s, :batch], scales[s], l1[s], 1e-3)
        w = params["W_dec"][s].astype(np.float64)
        g = grads["W_dec"] - np.sum(grads["W_dec"] * w, -1, keepdims=True) / np.sum(w * w, -1, keepdims=True) * w
        new = w - 1e-3 * g / (np.abs(g) + 1e-8)
        new /= np.linalg.norm(new, axis=-1, keepdims=True)
        clear = np.abs(g) > 1e-3
        assert clear.mean() > 0.5
        np.testing.assert_allclose(perp.params["W_dec"][s][clear], new[clear], atol=2e-6)
        assert not np.allclose(perp.params["W_dec"][s], one.params["W_dec"][s], atol=1e-5)  # the option acts

    kw = dict(steps=5, batch_size=batch, l1=l1, lr=1e-3, params=params, threads=2)
    bmm, loop = sae.train_saes_bmm(x, f, **kw), sae.train_saes_loop(x, f, **kw)
    np.testing.assert_allclose(loop.losses, bmm.losses, rtol=1e-5)
    for k in sae.PARAM_NAMES:
        np.testing.assert_allclose(loop.params[k], bmm.params[k], atol=1e-5, err_msg=k)
        assert bmm.params[k].shape == params[k].shape
    np.testing.assert_allclose(np.linalg.norm(bmm.params["W_dec"], axis=-1), 1.0, rtol=1e-5)
    assert np.all(bmm.losses[:, -1] < bmm.losses[:, 0])
    np.testing.assert_array_equal(params["W_dec"], sae.init_params(n_sae, d, f, seed=1)["W_dec"])  # not in place


def test_saelens_wrapper_first_loss_matches_and_trains():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(2, 256, 16)) + 0.5).astype(np.float32)
    kw = dict(steps=4, batch_size=64, l1=0.2, lr=1e-3, threads=2)
    ours, lens = sae.train_saes_bmm(x, 32, **kw), sae.train_saes_saelens(x, 32, **kw)
    # Same init (unit decoder rows), same scaled batch: SAELens' decoder-norm-weighted L1 equals ours.
    np.testing.assert_allclose(lens.losses[:, 0], ours.losses[:, 0], rtol=1e-5)
    assert lens.losses.shape == (2, 4) and np.all(lens.losses[:, -1] < lens.losses[:, 0])
    assert not np.allclose(lens.params["W_dec"], sae.init_params(2, 16, 32)["W_dec"])


def test_max_cosine_matches_numpy_float64_with_dead_rows():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(37, 20)), rng.normal(size=(53, 20))
    a[[3, 30]] = 0.0
    b[[0, 7]] = 0.0
    b[11] = -5.0 * a[5]  # exact anti-match: |cos| finds it, signed cosine does not
    an = a / np.where(np.linalg.norm(a, axis=1, keepdims=True) > 0, np.linalg.norm(a, axis=1, keepdims=True), 1)
    bn = b / np.where(np.linalg.norm(b, axis=1, keepdims=True) > 0, np.linalg.norm(b, axis=1, keepdims=True), 1)
    cos = an @ bn.T
    for absolute in (False, True):
        c = np.abs(cos) if absolute else cos
        c[:, [0, 7]] = -np.inf
        live = np.ones(37, bool)
        live[[3, 30]] = False
        results = [geometry.max_cosine(a, b, chunk=8, absolute=absolute, threads=2)]
        if not absolute:
            results.append(numpy_geometry.max_cosine(a, b, chunk=8))
        for best, idx in results:
            np.testing.assert_allclose(best[live], c.max(1)[live], atol=1e-6)
            np.testing.assert_array_equal(idx[live], c.argmax(1)[live])
            assert np.isnan(best[~live]).all() and (idx[~live] == -1).all()
    assert idx[5] == 11
    for best, idx in (geometry.max_cosine(a, np.zeros((4, 20))), numpy_geometry.max_cosine(a, np.zeros((4, 20)))):
        assert np.isnan(best).all() and (idx == -1).all()


def test_subspace_and_principal_angles_match_numpy_and_scipy():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(60, 30)) * rng.uniform(0.1, 3.0, size=(60, 1))  # uneven row norms
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    vt = np.linalg.svd(wn, full_matrices=False)[2][:5]
    for basis in (geometry.top_subspace(w, 5, threads=2), geometry.top_subspace(w, 5, method="gram"),
                  numpy_geometry.top_subspace(w, 5)):
        np.testing.assert_allclose(basis.T @ basis, vt.T @ vt, atol=1e-5)  # same subspace (projectors)
        np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-5)

    u, v = rng.normal(size=(6, 30)), rng.normal(size=(4, 30))
    ref = np.sort(np.degrees(scipy.linalg.subspace_angles(u.T, v.T)))
    for x, y in ((u, v), (v, u)):
        np.testing.assert_allclose(geometry.principal_angles(x, y), ref, atol=1e-9)
        np.testing.assert_allclose(numpy_geometry.principal_angles(x, y), ref, atol=1e-9)
    pair = numpy_geometry.subspace_angles(w, w[::-1] * 2.0, 5)  # the same rows: the same subspace
    np.testing.assert_allclose(pair, 0.0, atol=0.05)

    # Known small angles: rotate e_i towards e_{4+i} by theta_i; arccos alone would lose these.
    theta = np.radians([1e-6, 1e-3, 0.5, 40.0])
    e = np.eye(30)
    p, q = e[:4], np.cos(theta)[:, None] * e[:4] + np.sin(theta)[:, None] * e[4:8]
    mix = rng.normal(size=(4, 4))  # a non-orthonormal basis of the same span
    np.testing.assert_allclose(geometry.principal_angles(mix @ p, q), np.degrees(theta), rtol=1e-6, atol=1e-12)


def test_linear_cka_matches_float64_formula():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(300, 12)) + 1e3).astype(np.float32)  # mean far above the spread
    y = (x[:, :8] @ rng.normal(size=(8, 9)) + 0.5 * rng.normal(size=(300, 9)) - 2e3).astype(np.float32)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    yc = y.astype(np.float64) - y.astype(np.float64).mean(0)
    ref = np.sum((yc.T @ xc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert 0.1 < ref < 0.99
    for chunk in (7, 300, 1000):
        np.testing.assert_allclose(geometry.linear_cka(x, y, chunk_rows=chunk, threads=2), ref, rtol=1e-10)
    np.testing.assert_allclose(geometry.linear_cka(x, x), 1.0, rtol=1e-12)
    # float32 products, centred first: float32 accuracy despite the mean 1e3 x the spread
    np.testing.assert_allclose(geometry.linear_cka(x, y, chunk_rows=100, dtype=torch.float32), ref, rtol=1e-5)
    np.testing.assert_allclose(numpy_geometry.linear_cka(x, y), ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_corpus_memmap_write_and_shuffled_read(tmp_path, dtype):
    rng = np.random.default_rng(8)
    rows = rng.normal(size=(3000, 16)).astype(np.float32)
    path = tmp_path / "rows.bin"
    nbytes = corpus.write_rows(path, (rows[i:i + 700] for i in range(0, 3000, 700)), 3000, 16, dtype=dtype)
    stored = rows.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else rows
    assert nbytes == path.stat().st_size == 3000 * 16 * (2 if dtype == "bfloat16" else 4)
    np.testing.assert_array_equal(corpus.to_float32(np.array(corpus.open_rows(path, 16, dtype=dtype)), dtype=dtype),
                                  stored)
    batches = list(corpus.shuffled_batches(path, 16, 256, chunk_rows=256, buffer_chunks=3, seed=1, dtype=dtype))
    assert len(batches) == 3000 // 256 and all(b.shape == (256, 16) and b.dtype == np.float32 for b in batches)
    got = np.concatenate(batches)
    where = {r.tobytes(): i for i, r in enumerate(stored)}
    index = np.array([where[r.tobytes()] for r in got])  # every row read is a stored row, none twice
    assert len(set(index)) == len(index)
    assert not np.all(np.diff(index) > 0)  # shuffled
    with pytest.raises(ValueError, match="expected n_rows"):
        corpus.write_rows(tmp_path / "short.bin", [rows[:10]], 20, 16, dtype=dtype)
