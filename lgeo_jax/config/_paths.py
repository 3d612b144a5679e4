"""Checks that the files a config points at exist (separate from validation, which needs no files).

The shipped paper configs carry `FILL_IN: ...` placeholders so they validate anywhere; a stage that
reads the checkpoint or Gemma Scope calls these checks and the user learns exactly what to fill in.
Relative paths are taken from the current working directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from lgeo_jax._files import read_json
from lgeo_jax.config._errors import Problem
from lgeo_jax.config._sections import StudyConfig, is_placeholder


def path_problems(config: StudyConfig) -> list[Problem]:
    """Every missing or placeholder path in `config`, with what to do about it."""
    return [*_checkpoint(config), *_data(config), *_gemma_scope(config)]


def _placeholder(path: str, value: str, what: str, example: str) -> Problem:
    return Problem(path, f"still the placeholder {value!r}; set it to {what}, e.g. --set {path}={example}")


def _checkpoint(config: StudyConfig) -> Iterator[Problem]:
    model = config.model
    if model.is_builtin:
        return
    if is_placeholder(model.checkpoint):
        yield _placeholder(
            "model.checkpoint",
            model.checkpoint,
            "a local Hugging Face Gemma-2 checkpoint "
            "directory (huggingface-cli download google/gemma-2-9b --local-dir DIR)",
            "/data/gemma-2-9b",
        )
        return
    cfg_path = os.path.join(model.checkpoint, "config.json")
    if not os.path.isdir(model.checkpoint):
        yield Problem("model.checkpoint", f"directory {model.checkpoint!r} not found")
        return
    try:
        hf = read_json(cfg_path, needed_by="a Hugging Face checkpoint directory")
    except (OSError, ValueError) as e:
        yield Problem("model.checkpoint", str(e))
        return
    actual = {"n_layers": hf.get("num_hidden_layers"), "d_model": hf.get("hidden_size")}
    for name, value in actual.items():
        declared = getattr(model, name)
        if declared is not None and value is not None and declared != value:
            yield Problem(f"model.{name}", f"declared {declared} but {cfg_path} says {value}")
    n_layers = actual["n_layers"]
    if model.n_layers is None and isinstance(n_layers, int):
        for i, layer in enumerate(config.extract.layers):
            if layer >= n_layers:
                yield Problem(
                    f"extract.layers[{i}]",
                    f"layer {layer} is out of range for {model.checkpoint} "
                    f"({n_layers} layers, valid 0..{n_layers - 1})",
                )


def _data(config: StudyConfig) -> Iterator[Problem]:
    data = config.data
    if data.is_local_file:
        if is_placeholder(data.source):
            yield _placeholder("data.source", data.source, "a local alpaca_data.json", "/data/alpaca_data.json")
        elif not os.path.isfile(data.source):
            yield Problem("data.source", f"file {data.source!r} not found")
    if data.tokenizer is not None:
        if is_placeholder(data.tokenizer):
            yield _placeholder("data.tokenizer", data.tokenizer, "a tokenizer directory", "/data/gemma-2-9b")
        elif not os.path.isdir(data.tokenizer):
            yield Problem("data.tokenizer", f"directory {data.tokenizer!r} not found (AutoTokenizer loads a directory)")


def _gemma_scope(config: StudyConfig) -> Iterator[Problem]:
    analysis = config.analysis
    for layer, directory in analysis.dictionary_dirs.items():
        if not os.path.isdir(directory):
            yield Problem(f"analysis.dictionary_dirs.{layer}", f"SAE directory {directory!r} not found")
    root = analysis.gemma_scope_dir
    if root is None:
        return
    if is_placeholder(root):
        yield _placeholder(
            "analysis.gemma_scope_dir",
            root,
            "a local copy of google/gemma-scope-9b-pt-res (or null to skip the Gemma Scope comparisons)",
            "/data/gemma-scope-9b-pt-res",
        )
        return
    if not os.path.isdir(root):
        yield Problem("analysis.gemma_scope_dir", f"directory {root!r} not found")
        return
    missing = [
        analysis.gemma_scope_params(layer)
        for layer in config.extract.layers
        if not os.path.isfile(os.path.join(root, analysis.gemma_scope_params(layer)))
    ]
    if missing:
        yield Problem(
            "analysis.gemma_scope_dir",
            f"{root!r} lacks {', '.join(missing)}; download those folders or change analysis.gemma_scope_l0",
        )
