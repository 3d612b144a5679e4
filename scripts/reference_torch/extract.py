"""Residual extraction with transformers + PEFT: the base pass, then one pass per adapter.

How a careful torch user extracts delta activations: one `PeftModel` holding every adapter (`load_adapter`
under its own name), `set_adapter` before each adapter's pass and `with model.disable_adapter():` for the
base pass, all under `torch.inference_mode()`.

Residuals come from forward hooks on the decoder blocks, not from `output_hidden_states`: transformers
applies the final norm to its *last* hidden state (docs/conventions.md wants the raw residual after every
block, the last one included), and hooks let the forward stop right after the deepest requested block, so
later blocks, the final norm and the LM head (a d x 256k matmul for Gemma) never run. Each hook copies its
block output straight into a preallocated float32 numpy array (one cast, no intermediate copies).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import peft
import torch
import transformers

from ._threads import set_threads


class _StopForward(Exception):
    """Raised by the deepest requested block's hook: nothing after that block needs to run."""


def load_peft_model(
    base_dir: str | os.PathLike, adapter_dirs: Sequence[str | os.PathLike], *, dtype: str | torch.dtype = "auto",
    device: str = "cpu",
) -> tuple[torch.nn.Module, list[str]]:
    """The base Gemma-2 (eager attention) with every PEFT adapter loaded, on ``device``, and the adapters' names.

    ``dtype="auto"`` keeps the checkpoint's dtype (bf16 for real Gemma, so the residual stream is bf16 too).
    Without adapters the plain transformers model comes back.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=dtype)
    names = [f"adapter_{i}" for i in range(len(adapter_dirs))]
    if adapter_dirs:
        model = peft.PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
        for name, path in zip(names[1:], adapter_dirs[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
    return model.to(device).eval(), names


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The Gemma2Model inside (embeddings + blocks); PEFT's LoRA layers live in it, so it sees the adapters."""
    lm = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return lm.model


def _active(model: torch.nn.Module, name: str | None):
    """Context for one pass: adapters disabled for the base (name None), else ``name`` active."""
    if name is None:
        return model.disable_adapter() if isinstance(model, peft.PeftModel) else contextlib.nullcontext()
    model.set_adapter(name)
    return contextlib.nullcontext()


def _register_hooks(decoder: torch.nn.Module, layers: Sequence[int], target: dict) -> list:
    """Hooks that copy block L's output into ``target["out"][i]`` ([b, T, D]); the deepest one stops the pass."""
    deepest = max(layers)

    def make(i: int, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [b, T, D]
            target["out"][i].copy_(hidden)  # casts to float32 in place
            if layer == deepest:
                raise _StopForward

        return hook

    return [decoder.layers[layer].register_forward_hook(make(i, layer)) for i, layer in enumerate(layers)]


def _check_layers(layers: Sequence[int], n_layers: int) -> None:
    if not layers or len(set(layers)) != len(layers) or not all(0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers {list(layers)} must be distinct block indices in [0, {n_layers})")


def residuals(
    model: torch.nn.Module,
    adapter_names: Sequence[str],
    input_ids: np.ndarray,
    layers: Sequence[int],
    *,
    attention_mask: np.ndarray | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Residuals after blocks ``layers``: [1 + n_adapters, n_layers, B, T, D] float32, index 0 = base.

    ``input_ids`` / ``attention_mask`` are [B, T] (1 = real token; left or right padding). Rows are run
    ``batch_size`` at a time on the model's device; each minibatch gets the base pass and then one pass per
    adapter; the hooks copy every captured block output into the host array as it comes.
    """
    decoder = _decoder(model)
    device = next(model.parameters()).device
    layers = list(layers)
    _check_layers(layers, len(decoder.layers))
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)  # [B, T]
    mask = torch.ones_like(ids)  # [B, T]
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    passes = [None, *adapter_names]
    out = np.empty((len(passes), len(layers), *ids.shape, decoder.config.hidden_size), np.float32)
    dest = torch.from_numpy(out)  # shares memory with out
    target: dict = {}
    hooks = _register_hooks(decoder, layers, target)
    try:
        with torch.inference_mode():
            for start in range(0, ids.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                for p, name in enumerate(passes):
                    target["out"] = dest[p, :, rows]  # [n_layers, b, T, D] view
                    with _active(model, name), contextlib.suppress(_StopForward):
                        decoder(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device),
                                use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out


def extract(
    base_dir: str | os.PathLike,
    adapter_dirs: Sequence[str | os.PathLike],
    input_ids: np.ndarray,
    layers: Sequence[int],
    *,
    attention_mask: np.ndarray | None = None,
    batch_size: int = 8,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    threads: int | None = None,
) -> np.ndarray:
    """Loads the HF base and PEFT adapter directories and returns `residuals` ([1 + A, n_layers, B, T, D])."""
    set_threads(threads)
    model, names = load_peft_model(base_dir, adapter_dirs, dtype=dtype, device=device)
    return residuals(model, names, input_ids, layers, attention_mask=attention_mask, batch_size=batch_size)


def deltas(h: np.ndarray) -> np.ndarray:
    """h_adapted - h_base in float32: [A, n_layers, B, T, D] from `residuals` output."""
    h = np.asarray(h, np.float32)
    return h[1:] - h[:1]
