"""YAML file -> a validated root `Section` (with `--set key=value` overrides), and back to YAML.

YAML is composed once for the data and once for the node tree, so every problem can name the line
of its key, and duplicate keys (which PyYAML silently resolves to the last one) are reported. Anchors
and aliases are refused: configs never need them, and aliases are how a 1 KB file expands without
bound (the "billion laughs"). Paths that must exist are the root's business: it may define
`path_problems()` (returning `Problem`s), called when `check_paths` is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from lgeo_jax.config._convert import _INVALID, Section, from_mapping, to_plain
from lgeo_jax.config._errors import ConfigError, Problem

MAX_CONFIG_BYTES = 1_000_000


def load_yaml(cls: type[Section], path: str | os.PathLike, overrides: Iterable[str] = (), *,
              check_paths: bool = False) -> Any:
    """Reads and validates a config of root type `cls`; raises one `ConfigError` naming every problem.

    `overrides` are `dotted.key=value` strings (value parsed as a YAML scalar or list, e.g.
    `extract.layers=[5,10]`). `check_paths` also runs the root's `path_problems()`.
    """
    source = os.fspath(path)
    try:
        if os.path.getsize(source) > MAX_CONFIG_BYTES:
            raise ConfigError([Problem("", f"config file is over {MAX_CONFIG_BYTES:,} bytes; is it a config?")],
                              source=source)
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read the config file ({e.strerror})")], source=source) from e
    except UnicodeDecodeError as e:
        raise ConfigError([Problem("", f"not UTF-8 text ({e.reason} at byte {e.start})")], source=source) from e
    return from_yaml(cls, text, overrides, check_paths=check_paths, source=source)


def from_yaml(cls: type[Section], text: str, overrides: Iterable[str] = (), *, check_paths: bool = False,
              source: str = "<yaml>") -> Any:
    """Same as `load_yaml` for YAML text already in memory."""
    problems: list[Problem] = []
    try:
        _refuse_aliases(text, source)
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
    return _build(cls, raw, problems, lines, source, check_paths)


def from_dict(cls: type[Section], raw: Mapping[str, Any], overrides: Iterable[str] = (), *,
              check_paths: bool = False, source: str = "<dict>") -> Any:
    """Same as `load_yaml` for an already-parsed mapping (e.g. a dumped config)."""
    problems: list[Problem] = []
    return _build(cls, apply_overrides(raw, list(overrides), problems), problems, {}, source, check_paths)


def _build(cls: type[Section], raw: Any, problems: list[Problem], lines: Mapping[str, int | None], source: str,
           check_paths: bool) -> Any:
    config = from_mapping(cls, raw, "", problems)
    if config is not _INVALID and check_paths and hasattr(config, "path_problems"):
        problems.extend(config.path_problems())
    if problems:
        raise ConfigError(problems, source=source).with_lines(lines, source)
    return config


def _refuse_aliases(text: str, source: str) -> None:
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            raise ConfigError([Problem("", f"YAML alias '*{event.anchor}' found; lgeo configs do not use anchors or "
                                           "aliases (write the values out)", line)], source=source)


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


def dump_yaml(config: Section) -> str:
    """A config as YAML (every field, defaults included); loading it gives an equal config."""
    return yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=False)


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
