"""YAML file -> StudyConfig (with `--set key=value` overrides), and back to YAML.

YAML is composed once for the data and once for the node tree, so every problem can name the line
of its key, and duplicate keys (which PyYAML silently resolves to the last one) are reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from lgeo_jax.config._convert import _INVALID, from_mapping, to_plain
from lgeo_jax.config._errors import ConfigError, Problem
from lgeo_jax.config._paths import path_problems
from lgeo_jax.config._sections import StudyConfig


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *, check_paths: bool = False) -> StudyConfig:
    """Reads and validates a study config; raises one `ConfigError` naming every problem.

    `overrides` are `dotted.key=value` strings (value parsed as a YAML scalar or list, e.g.
    `extract.layers=[5,10]`). `check_paths` also requires the checkpoint, data, tokenizer and Gemma
    Scope paths to exist (stages that read them call it; `lgeo validate` may skip it).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read the config file ({e.strerror})")], source=source) from e
    return config_from_yaml(text, overrides, check_paths=check_paths, source=source)


def config_from_yaml(
    text: str, overrides: Iterable[str] = (), *, check_paths: bool = False, source: str = "<yaml>"
) -> StudyConfig:
    """Same as `load_config` for YAML text already in memory."""
    problems: list[Problem] = []
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text), "", problems)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e)
        col = f", column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([Problem("", f"malformed YAML{col}: {what}", line)], source=source) from e
    if raw is None:
        raw = {}
    overrides = list(overrides)
    if overrides:
        source += " with --set " + " ".join(overrides)
    raw = apply_overrides(raw, overrides, problems) if isinstance(raw, Mapping) else raw
    for item in overrides:  # an overridden key's problems have no line in the file
        lines[item.partition("=")[0].strip()] = None
    return _build(raw, problems, lines, source, check_paths)


def config_from_dict(
    raw: Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    check_paths: bool = False,
    source: str = "<dict>",
) -> StudyConfig:
    """Same as `load_config` for an already-parsed mapping (e.g. a dumped config)."""
    problems: list[Problem] = []
    return _build(apply_overrides(raw, list(overrides), problems), problems, {}, source, check_paths)


def _build(
    raw: Any, problems: list[Problem], lines: Mapping[str, int | None], source: str, check_paths: bool
) -> StudyConfig:
    config = from_mapping(StudyConfig, raw, "", problems)
    if config is not _INVALID and check_paths:
        problems.extend(path_problems(config))
    if problems:
        raise ConfigError(problems, source=source).with_lines(lines, source)
    return config


def apply_overrides(raw: Mapping[str, Any], overrides: list[str], problems: list[Problem]) -> dict:
    """A copy of `raw` with each `a.b.c=value` applied; malformed overrides become problems."""
    out = _copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(key or item, f"override {item!r} is not of the form dotted.key=value"))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problems.append(Problem(key, f"override value {text!r} is not valid YAML ({getattr(e, 'problem', e)})"))
            continue
        node, parts = out, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problems.append(
                    Problem(
                        ".".join(parts[: depth + 1]),
                        f"cannot set {key}: this key holds {node[part]!r}, not a mapping",
                    )
                )
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return out


def to_dict(config: StudyConfig) -> dict[str, Any]:
    """The config as plain data (every field, defaults included; enums by value, tuples as lists)."""
    return to_plain(config)


def dump_config(config: StudyConfig) -> str:
    """The config as YAML (every field, defaults included); loading it gives an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _key_lines(node: yaml.Node | None, path: str, problems: list[Problem]) -> dict[str, int | None]:
    """Maps each dotted key path (`sae.l1`, `extract.layers[2]`) to its 1-based YAML line."""
    lines: dict[str, int | None] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            if child in lines:
                problems.append(
                    Problem(
                        child,
                        "duplicate key (PyYAML would silently keep the last one)",
                        key_node.start_mark.line + 1,
                    )
                )
            lines[child] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, child, problems))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{path}[{i}]"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{path}[{i}]", problems))
    return lines
