"""SAE formats: our exports run identically in SAELens / sparsify / plain numpy, and third-party dirs load."""

import json

import numpy as np
import pytest
import torch
from sae_lens import SAE as LensSAE
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

from lgeo_jax.sae import (
    SAE,
    Arch,
    SAEConfig,
    export_sae,
    gemma_scope_path,
    load_gemma_scope,
    load_sae,
    save_sae,
)

D, F = 23, 61  # primes, so a transposed axis cannot pass for the right one


def random_sae(arch: Arch, scale: float, seed: int = 0, k: int | None = None) -> SAE:
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(size=(D, F)), "b_enc": rng.normal(size=F) * 0.3,
              "W_dec": rng.normal(size=(F, D)), "b_dec": rng.normal(size=D)}
    if arch.has_threshold:
        params["threshold"] = np.abs(rng.normal(size=F))
    return SAE(SAEConfig(D, F, arch, k=k), {n: v.astype(np.float32) for n, v in params.items()}, scale)


def inputs(scale: float, n: int = 37, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, D)) * scale).astype(np.float32)


def np_jumprelu(p: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gemma Scope's forward, float64, written from its definition (no b_dec subtraction)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    pre = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]
    f = (pre > p["threshold"]) * np.maximum(pre, 0)
    return f, f @ p["W_dec"] + p["b_dec"]


def assert_rel(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("arch,k", [(Arch.RELU, None), (Arch.JUMPRELU, None), (Arch.TOPK, 7), (Arch.BATCHTOPK, 7)])
def test_saelens_export_matches_saelens_forward(tmp_path, arch, k):
    sae = random_sae(arch, scale=3.7, k=k)
    export_sae_dir = tmp_path / "ours"
    save_sae(export_sae_dir, sae)
    export_sae(export_sae_dir, "saelens", tmp_path / "lens")
    lens = LensSAE.load_from_disk(tmp_path / "lens")
    x = inputs(3.7)
    with torch.no_grad():
        f_ref = lens.encode(torch.from_numpy(x)).numpy()
        x_hat_ref = lens.decode(lens.encode(torch.from_numpy(x))).numpy()
    assert (f_ref > 0).sum() > 0.05 * f_ref.size  # enough active latents for the comparison to mean something
    assert_rel(sae.encode(x), f_ref)
    assert_rel(sae.reconstruct(x), x_hat_ref)
    # and back: loading the export gives the same function (scale folded, so scale 1)
    again = load_sae(tmp_path / "lens")
    assert again.scale == 1.0
    assert_rel(again.reconstruct(x), x_hat_ref)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_load_saelens_written_by_saelens(tmp_path, apply_b_dec_to_input):
    torch.manual_seed(0)
    lens = StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=apply_b_dec_to_input))
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    lens.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture is Arch.RELU
    x = inputs(1.0)
    with torch.no_grad():
        f_ref = lens.encode(torch.from_numpy(x)).numpy()
        x_hat_ref = lens(torch.from_numpy(x)).numpy()
    assert_rel(ours.encode(x), f_ref)
    assert_rel(ours.reconstruct(x), x_hat_ref)


def test_load_saelens_jumprelu(tmp_path):
    torch.manual_seed(1)
    lens = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))
    with torch.no_grad():
        for name, p in lens.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 if name == "threshold" else torch.randn_like(p) * 0.5)
    lens.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = inputs(1.0)
    with torch.no_grad():
        assert_rel(ours.encode(x), lens.encode(torch.from_numpy(x)).numpy())
        assert_rel(ours.reconstruct(x), lens(torch.from_numpy(x)).numpy())


def test_saelens_jumprelu_without_apply_b_dec_to_input_takes_saelens_default(tmp_path):
    """A SAELens JumpReLU cfg.json without `apply_b_dec_to_input` loads as SAELens itself loads it: with its
    dataclass default (b_dec subtracted), not Gemma Scope's convention."""
    assert JumpReLUSAEConfig(d_in=D, d_sae=F).apply_b_dec_to_input is True  # the default we rely on
    torch.manual_seed(3)
    lens = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))
    with torch.no_grad():
        for name, p in lens.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 if name == "threshold" else torch.randn_like(p) * 0.5)
    lens.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.pop("apply_b_dec_to_input")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    again = LensSAE.load_from_disk(tmp_path)
    ours = load_sae(tmp_path)
    x = inputs(1.0)
    with torch.no_grad():
        f_ref = again.encode(torch.from_numpy(x)).numpy()
        x_hat_ref = again(torch.from_numpy(x)).numpy()
    assert (f_ref > 0).sum() > 0.05 * f_ref.size
    assert_rel(ours.encode(x), f_ref)
    assert_rel(ours.reconstruct(x), x_hat_ref)


@pytest.mark.parametrize("arch", [Arch.RELU, Arch.JUMPRELU, Arch.BATCHTOPK])
def test_gemma_scope_export_gives_numpy_jumprelu(tmp_path, arch):
    sae = random_sae(arch, scale=0.37, seed=2, k=7 if arch is Arch.BATCHTOPK else None)
    save_sae(tmp_path / "ours", sae)
    export_sae(tmp_path / "ours", "gemmascope", tmp_path / "gs")
    with np.load(tmp_path / "gs" / "params.npz", allow_pickle=False) as npz:
        p = {k: npz[k] for k in npz.files}
    assert set(p) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    x = inputs(0.37)
    f_ref, x_hat_ref = np_jumprelu(p, x)
    assert (f_ref > 0).sum() > 0.05 * f_ref.size
    assert_rel(sae.encode(x), f_ref)
    assert_rel(sae.reconstruct(x), x_hat_ref)


def test_load_gemma_scope_release_layout(tmp_path):
    rng = np.random.default_rng(3)
    p = {"W_enc": rng.normal(size=(D, F)), "W_dec": rng.normal(size=(F, D)), "b_enc": rng.normal(size=F),
         "b_dec": rng.normal(size=D), "threshold": np.abs(rng.normal(size=F))}
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_77"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in p.items()})
    path = tmp_path / gemma_scope_path(5, "width_16k", 77)
    sae = load_gemma_scope(path)
    x = inputs(1.0)
    f_ref, x_hat_ref = np_jumprelu(p, x)
    assert_rel(sae.encode(x), f_ref)
    assert_rel(sae.reconstruct(x), x_hat_ref)
    assert load_sae(folder).cfg == sae.cfg  # the directory loads as the same SAE


def test_sparsify_export_matches_sparsify_math(tmp_path):
    """sparsify's forward: ``top_k(relu(encoder(x - b_dec)))``, decode ``acts @ W_dec[idx] + b_dec``."""
    k = 5
    sae = random_sae(Arch.TOPK, scale=2.3, seed=4, k=k)
    save_sae(tmp_path / "ours", sae)
    export_sae(tmp_path / "ours", "sparsify", tmp_path / "sp")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert (cfg["k"], cfg["num_latents"], cfg["d_in"]) == (k, F, D)
    from safetensors.numpy import load_file

    w = {n: v.astype(np.float64) for n, v in load_file(str(tmp_path / "sp" / "sae.safetensors")).items()}
    x = inputs(2.3).astype(np.float64)
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)  # [N, F]
    idx = np.argsort(-pre, axis=-1)[:, :k]
    acts = np.take_along_axis(pre, idx, axis=-1)
    x_hat_ref = np.einsum("nk,nkd->nd", acts, w["W_dec"][idx]) + w["b_dec"]
    f_ref = np.zeros_like(pre)
    np.put_along_axis(f_ref, idx, acts, axis=-1)
    assert_rel(sae.encode(x.astype(np.float32)), f_ref)
    assert_rel(sae.reconstruct(x.astype(np.float32)), x_hat_ref)
    assert_rel(load_sae(tmp_path / "sp").reconstruct(x.astype(np.float32)), x_hat_ref)


def test_our_format_round_trip(tmp_path):
    sae = random_sae(Arch.RELU, scale=5.0)
    save_sae(tmp_path, sae, {"name": "r4/L5"})
    back = load_sae(tmp_path)
    assert back.cfg == sae.cfg and back.scale == sae.scale
    for name, value in sae.params.items():
        np.testing.assert_array_equal(back.params[name], value)
    assert json.loads((tmp_path / "cfg.json").read_text())["name"] == "r4/L5"


def test_format_errors(tmp_path):
    save_sae(tmp_path / "relu", random_sae(Arch.RELU, 1.0))
    save_sae(tmp_path / "topk", random_sae(Arch.TOPK, 1.0, k=3))
    save_sae(tmp_path / "batchtopk", random_sae(Arch.BATCHTOPK, 1.0, k=3))
    with pytest.raises(ValueError, match="TopK"):
        export_sae(tmp_path / "topk", "gemmascope", tmp_path / "x")
    with pytest.raises(ValueError, match="sparsify holds TopK SAEs only; this SAE is 'batchtopk'"):
        export_sae(tmp_path / "batchtopk", "sparsify", tmp_path / "x")
    with pytest.raises(ValueError, match="sparsify holds TopK"):
        export_sae(tmp_path / "relu", "sparsify", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown format"):
        export_sae(tmp_path / "relu", "onnx", tmp_path / "x")
    with pytest.raises(ValueError, match="no SAE found"):
        load_sae(tmp_path / "x")
    with pytest.raises(ValueError, match="d_in=23"):
        load_sae(tmp_path / "relu").encode(np.zeros((2, D + 1), np.float32))
    with pytest.raises(ValueError, match="W_dec has shape"):
        SAE(SAEConfig(D, F), {"W_enc": np.zeros((D, F)), "b_enc": np.zeros(F), "W_dec": np.zeros((D, F)),
                              "b_dec": np.zeros(D)})


_NO_TORCH_LOAD = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import numpy as np
from lgeo_jax.sae import load_sae
x = np.load(sys.argv[2])
sae = load_sae(sys.argv[1])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] == "torch"]
np.savez(sys.argv[3], f=np.asarray(sae.encode(x)), x_hat=np.asarray(sae.reconstruct(x)))
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_saelens_directory_loads_without_torch(tmp_path, dtype):
    """A plain `pip install -e .` has no torch: SAELens directories (float32 and bf16) must still load, and give
    SAELens's own encode / decode."""
    import subprocess
    import sys

    from e2e import REPO
    from sae_lens import SAE as SAELensSAE

    torch.manual_seed(2)
    lens = StandardSAE(StandardSAEConfig(d_in=D, d_sae=F))
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    lens.to(dtype).save_model(tmp_path / "sae")
    # the reference: SAELens's own loader and forward in float32, on exactly the stored (rounded) weights
    lens = SAELensSAE.load_from_disk(tmp_path / "sae", dtype="float32")
    x = inputs(1.0)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH_LOAD, str(tmp_path / "sae"), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        f_ref = lens.encode(torch.from_numpy(x)).numpy()
        x_hat_ref = lens(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out["f"], f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["x_hat"], x_hat_ref, rtol=1e-5, atol=1e-5)
