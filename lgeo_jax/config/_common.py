"""Vocabulary every package's config shares: dtypes, `FILL_IN` placeholders, and section hashes."""

from __future__ import annotations

import enum

from lgeo_jax.config._convert import Section, to_plain
from lgeo_jax.files import json_hash

PLACEHOLDER_PREFIX = "FILL_IN"


class DType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


def is_placeholder(value: str | None) -> bool:
    """True for values the user must still fill in (`FILL_IN: ...` in the shipped configs)."""
    return isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX)


def section_hash(name: str, value: Section) -> str:
    """16 hex digits identifying the result-relevant values of section `name`: SHA-256 of its canonical JSON
    (sorted keys, enums by value, tuples as lists, fields marked `affects_results=False` left out), so key
    order in a YAML file, or spelling a default out, never changes it."""
    return json_hash({"section": name, "values": to_plain(value, results_only=True)})
