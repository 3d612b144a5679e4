"""Stable hashes of config sections, so a stage can tell whether what it depends on has changed.

The hash is SHA-256 of the section's canonical JSON (sorted keys, no whitespace, enums by value,
tuples as lists, operational fields marked `affects_results=False` left out). It depends on
values only: the order of keys in a YAML file, or spelling a default out, never changes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lgeo_jax.config._convert import to_plain
from lgeo_jax.config._sections import SECTION_NAMES, StudyConfig


def canonical_json(value: Any) -> str:
    """Deterministic JSON text of plain data (what gets hashed)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def section_hash(config: StudyConfig, name: str) -> str:
    """16 hex digits identifying the result-relevant values of section `name`."""
    if name not in SECTION_NAMES:
        raise ValueError(f"section_hash: unknown section {name!r}; expected one of {', '.join(SECTION_NAMES)}")
    plain = {"section": name, "values": to_plain(getattr(config, name), results_only=True)}
    return hashlib.sha256(canonical_json(plain).encode()).hexdigest()[:16]


def section_hashes(config: StudyConfig, names: tuple[str, ...] = SECTION_NAMES) -> dict[str, str]:
    return {name: section_hash(config, name) for name in names}
