"""Reading the small JSON files other tools write (HF config.json, PEFT adapter_config.json), with errors
that name the file and say what it is for."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, *, needed_by: str) -> Any:
    """Parsed JSON at `path`; FileNotFoundError / ValueError naming the file and `needed_by` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; {needed_by} needs {os.path.basename(path)}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
