"""SAE directories on disk: ours, Gemma Scope ``params.npz``, SAELens and sparsify; load any, export ours.

Third-party formats see raw activations, so exports fold our RMS scale ``s`` into the weights: with the SAE
seeing ``x / s``, ``W_enc' = W_enc / s``, ``W_dec' = s W_dec``, ``b_dec' = s b_dec`` (``b_enc`` and the
JumpReLU threshold are unchanged) gives the same latents and the reconstruction in original units. The
b_dec-subtraction convention is converted where formats differ: a ReLU SAE written as Gemma Scope npz (no
subtraction) gets ``b_enc' = b_enc - b_dec' W_enc'`` and a zero threshold (JumpReLU at 0 is ReLU); a BatchTopK
SAE is written as the JumpReLU SAE it runs as (SAELens saves it that way too).
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np

from lgeo_jax.config import ConfigError, to_plain
from lgeo_jax.files import atomic_write_json, atomic_write_npz, read_json
from lgeo_jax.sae._config import Arch, SAEConfig
from lgeo_jax.sae._models import SAE, param_names
from lgeo_jax.safetensors_io import read_safetensors, write_safetensors

OUR_CFG, OUR_WEIGHTS = "cfg.json", "params.safetensors"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, GEMMA_SCOPE_FILE = "sae_weights.safetensors", "sae.safetensors", "params.npz"
FORMATS = ("lgeo", "saelens", "gemmascope", "sparsify")


def _f32(params: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in params.items()}


def _load_f32(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 numpy, bfloat16 included (sparsify and some SAELens releases store bf16)."""
    params = read_safetensors(path, dtype=np.float32)
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: tensor(s) {bad} contain NaN or Inf")
    return params


def _sae(cfg: dict, path: pathlib.Path) -> SAEConfig:
    try:
        return SAEConfig(**cfg)
    except (ConfigError, TypeError) as e:
        raise ValueError(f"{path}: not a valid SAE configuration ({e})") from e


def _config_file(path: pathlib.Path) -> dict:
    cfg = read_json(path / "cfg.json", needed_by="an SAE directory")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / 'cfg.json'}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def save_sae(path: str | pathlib.Path, sae: SAE, extra: dict | None = None) -> None:
    """Our format: ``cfg.json`` (config, scale, free-form ``extra`` such as name/L1/seed) + ``params.safetensors``."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / OUR_WEIGHTS, _f32({k: sae.params[k] for k in param_names(sae.cfg)}))
    meta = {"format": "lgeo_sae", "version": 2, "sae": to_plain(sae.cfg), "scale": float(sae.scale), **(extra or {})}
    atomic_write_json(path / OUR_CFG, meta)


def load_sae(path: str | pathlib.Path) -> SAE:
    """Load an SAE directory of any supported format (ours, SAELens, sparsify, Gemma Scope npz dir or file)."""
    path = pathlib.Path(path)
    if path.name == GEMMA_SCOPE_FILE or (path / GEMMA_SCOPE_FILE).is_file():
        return load_gemma_scope(path)
    if (path / OUR_WEIGHTS).is_file():
        meta = _config_file(path)
        if not isinstance(meta.get("sae"), dict) or meta.get("version") != 2:
            raise ValueError(f"{path / OUR_CFG}: not an lgeo SAE config of version 2 (has keys {sorted(meta)}); "
                             "re-export it with this version of lgeo")
        return SAE(_sae(meta["sae"], path), _load_f32(path / OUR_WEIGHTS), float(meta["scale"]))
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify(path)
    raise ValueError(f"{path}: no SAE found (expected {OUR_WEIGHTS}, {SAELENS_WEIGHTS}, {SPARSIFY_WEIGHTS} "
                     f"or {GEMMA_SCOPE_FILE})")


def gemma_scope_path(layer: int, width: str, l0: int) -> pathlib.Path:
    """``layer_L/width_W/average_l0_N/params.npz`` (relative), the Gemma Scope release layout; `width` is the
    folder name, e.g. ``width_16k``. The one place this layout is spelled out."""
    return pathlib.Path(f"layer_{layer}") / width / f"average_l0_{l0}" / GEMMA_SCOPE_FILE


def load_gemma_scope(path: str | pathlib.Path) -> SAE:
    """A Gemma Scope ``params.npz`` (file or its directory): JumpReLU without b_dec subtraction, scale 1."""
    path = pathlib.Path(path)
    path = path if path.suffix == ".npz" else path / GEMMA_SCOPE_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            params = {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable Gemma Scope params.npz ({type(e).__name__}: {e})") from e
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(params)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)} (Gemma Scope npz holds W_enc, W_dec, b_enc, "
                         "b_dec, threshold)")
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad or params["W_enc"].ndim != 2:
        raise ValueError(f"{path}: " + (f"array(s) {bad} contain NaN or Inf" if bad else
                                        f"W_enc has shape {params['W_enc'].shape}, expected (d_in, d_sae)"))
    d_in, d_sae = params["W_enc"].shape
    return SAE(SAEConfig(d_in, d_sae, Arch.JUMPRELU), params)


def load_saelens(path: str | pathlib.Path) -> SAE:
    """A SAELens directory (standard / jumprelu / topk, ``normalize_activations: none``), as our forms. A missing
    ``apply_b_dec_to_input`` takes SAELens' own default, True for every architecture (``SAEConfig``; its
    JumpReLU config does not override it), so such a JumpReLU SAE subtracts b_dec like the others."""
    path = pathlib.Path(path)
    cfg = _config_file(path)
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path}/cfg.json: normalize_activations={cfg['normalize_activations']!r} is not "
                         "supported; only 'none'")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(f"{path}/cfg.json: rescale_acts_by_decoder_norm=true TopK SAEs are not supported")
    ours = {"standard": Arch.RELU, "jumprelu": Arch.JUMPRELU, "topk": Arch.TOPK}.get(arch)
    if ours is None:
        raise ValueError(f"{path}/cfg.json: architecture {arch!r} not supported (standard, jumprelu, topk)")
    params = _load_f32(path / SAELENS_WEIGHTS)
    params.pop("log_threshold", None)
    subtracts = bool(cfg.get("apply_b_dec_to_input", True))
    if subtracts != ours.subtracts_b_dec:
        # Move b_dec between the input and b_enc; pre-activations (and so the threshold test) are unchanged.
        sign = 1.0 if subtracts else -1.0
        params["b_enc"] = params["b_enc"] - sign * params["b_dec"] @ params["W_enc"]
    sae_cfg = _sae({"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "architecture": ours,
                    "k": cfg.get("k") if ours is Arch.TOPK else None}, path / "cfg.json")
    missing = set(param_names(sae_cfg)) - set(params)
    if missing:
        raise ValueError(f"{path / SAELENS_WEIGHTS}: missing tensor(s) {sorted(missing)}")
    return SAE(sae_cfg, {k: params[k] for k in param_names(sae_cfg)})


def load_sparsify(path: str | pathlib.Path) -> SAE:
    """A sparsify TopK directory: ``encoder.weight [F, D]``, ``encoder.bias``, ``W_dec [F, D]``, ``b_dec``."""
    path = pathlib.Path(path)
    cfg = _config_file(path)
    if cfg.get("skip_connection") or cfg.get("multi_topk"):
        raise ValueError(f"{path}/cfg.json: skip_connection / multi_topk sparsify SAEs are not supported")
    w = _load_f32(path / SPARSIFY_WEIGHTS)
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(w)
    if missing or w.get("W_dec", np.zeros(0)).ndim != 2:
        raise ValueError(f"{path / SPARSIFY_WEIGHTS}: expected tensors encoder.weight, encoder.bias, W_dec [F, D] and "
                         f"b_dec" + (f"; missing {sorted(missing)}" if missing else ""))
    params = {"W_enc": w["encoder.weight"].T.copy(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"],
              "b_dec": w["b_dec"]}
    d_sae, d_in = w["W_dec"].shape
    return SAE(_sae({"d_in": d_in, "d_sae": d_sae, "architecture": Arch.TOPK, "k": cfg.get("k")}, path / "cfg.json"),
               params)


def _folded(sae: SAE) -> dict[str, np.ndarray]:
    """Parameters acting on raw activations (the RMS scale folded in)."""
    p, s = _f32(sae.params), float(sae.scale)
    out = {"W_enc": p["W_enc"] / s, "b_enc": p["b_enc"], "W_dec": p["W_dec"] * s, "b_dec": p["b_dec"] * s}
    if "threshold" in p:
        out["threshold"] = p["threshold"]
    return out


def write_saelens(sae: SAE, out_dir: str | pathlib.Path) -> None:
    """SAELens directory (`cfg.json` + `sae_weights.safetensors`), scale folded in."""
    out_dir = pathlib.Path(out_dir)
    arch = {Arch.RELU: "standard", Arch.JUMPRELU: "jumprelu", Arch.TOPK: "topk",
            Arch.BATCHTOPK: "jumprelu"}[sae.cfg.architecture]
    cfg = {"architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.cfg.architecture.subtracts_b_dec, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"exported_by": "lgeo_jax"}}
    if sae.cfg.architecture is Arch.TOPK:
        cfg["k"] = sae.cfg.k
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / SAELENS_WEIGHTS, _folded(sae))
    atomic_write_json(out_dir / "cfg.json", cfg)


def write_gemma_scope(sae: SAE, out_dir: str | pathlib.Path) -> None:
    """Gemma Scope `params.npz` (JumpReLU form, no b_dec subtraction), scale folded in."""
    out_dir = pathlib.Path(out_dir)
    if sae.cfg.architecture is Arch.TOPK:
        raise ValueError("Gemma Scope npz holds JumpReLU SAEs; a TopK SAE cannot be written in it (use sparsify)")
    p = _folded(sae)
    if sae.cfg.architecture.subtracts_b_dec:  # ReLU, BatchTopK
        p["b_enc"] = p["b_enc"] - p["b_dec"] @ p["W_enc"]
    if sae.cfg.architecture is Arch.RELU:
        p["threshold"] = np.zeros(sae.cfg.d_sae, np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(out_dir / GEMMA_SCOPE_FILE, p)


def write_sparsify(sae: SAE, out_dir: str | pathlib.Path) -> None:
    """sparsify directory (`cfg.json` + `sae.safetensors`) for a TopK SAE, scale folded in."""
    out_dir = pathlib.Path(out_dir)
    if sae.cfg.architecture is not Arch.TOPK:
        raise ValueError(f"sparsify holds TopK SAEs only; this SAE is {sae.cfg.architecture.value!r} (use saelens)")
    p = _folded(sae)
    cfg = {"expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in), "normalize_decoder": False,
           "num_latents": sae.cfg.d_sae, "k": sae.cfg.k, "multi_topk": False, "skip_connection": False,
           "d_in": sae.cfg.d_in}
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": np.ascontiguousarray(p["W_enc"].T), "encoder.bias": p["b_enc"], "W_dec": p["W_dec"],
               "b_dec": p["b_dec"]}
    write_safetensors(out_dir / SPARSIFY_WEIGHTS, tensors)
    atomic_write_json(out_dir / "cfg.json", cfg)


def export_sae(sae_dir: str | pathlib.Path, fmt: str, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Convert the SAE in ``sae_dir`` (any loadable format) to ``fmt`` in ``out_dir``; returns ``out_dir``."""
    writers = {"lgeo": lambda sae, out: save_sae(out, sae), "saelens": write_saelens,
               "gemmascope": write_gemma_scope, "sparsify": write_sparsify}
    if fmt not in writers:
        raise ValueError(f"export_sae: unknown format {fmt!r}; choose one of {FORMATS}")
    out_dir = pathlib.Path(out_dir)
    writers[fmt](load_sae(sae_dir), out_dir)
    return out_dir
