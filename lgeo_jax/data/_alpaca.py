"""Loading Alpaca records from a local JSON/JSONL file, a ``datasets`` directory or the hub.

Every source ends as a list of :class:`AlpacaRecord`; extra columns (the hub adds ``text``) are
ignored. The record order is the file/hub order, so index splits refer to the same examples as the
paper's ``tatsu-lab/alpaca`` indices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from lgeo_jax.data._records import AlpacaRecord
from lgeo_jax.files import atomic_write_text

ALPACA_HUB_ID = "tatsu-lab/alpaca"
# sha256 of the full stanford_alpaca ``alpaca_data.json`` (52,002 records, 22,773,992 bytes).
ALPACA_DATA_SHA256 = "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419"
_FIELDS = ("instruction", "input", "output")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def records_from_dicts(rows: Iterable[Mapping[str, object]], source: str) -> list[AlpacaRecord]:
    """Validate rows with string ``instruction``/``input``/``output`` fields and build records.

    A missing ``input`` is read as ``""`` (some Alpaca derivatives drop the empty column); a row that is not
    an object, or any other missing or non-string field, raises ValueError naming the source, row and field.
    """
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{source}: record {i} is a {type(row).__name__}, expected an object with "
                             f"{', '.join(_FIELDS)}")
        values = {"input": ""} | {k: row[k] for k in _FIELDS if k in row}
        for name in _FIELDS:
            if name not in values:
                raise ValueError(f"{source}: record {i} has no '{name}' field (fields: {sorted(map(str, row))})")
            if not isinstance(values[name], str):
                raise ValueError(f"{source}: record {i} field '{name}' is {type(values[name]).__name__}, "
                                 "expected str")
        records.append(AlpacaRecord(**values))
    if not records:
        raise ValueError(f"{source}: the dataset is empty; expected Alpaca records")
    return records


def _read_json_rows(path: Path) -> list[Mapping[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") from e
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def load_alpaca(
    source: str | Path = ALPACA_HUB_ID, *, sha256: str | None = None, split: str = "train"
) -> list[AlpacaRecord]:
    """Load Alpaca records from ``source``.

    ``source`` is a ``.json`` (list) or ``.jsonl`` file, a directory written by
    ``datasets.Dataset.save_to_disk``, or otherwise a ``datasets`` hub id (default ``tatsu-lab/alpaca``,
    needs network). ``sha256``, when given, is checked against the file's bytes before parsing (use
    :data:`ALPACA_DATA_SHA256` for the full ``alpaca_data.json``); it only applies to files.
    """
    path = Path(source)
    if path.is_file():
        if sha256 is not None:
            actual = file_sha256(path)
            if actual != sha256.lower():
                raise ValueError(
                    f"{path}: sha256 {actual} does not match the expected {sha256}; "
                    "re-download the file or pass sha256=None to skip the check"
                )
        return records_from_dicts(_read_json_rows(path), str(path))
    if sha256 is not None:
        raise ValueError(f"{source}: sha256 verification needs a local file, not a directory or hub id")
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split '{split}' (splits: {sorted(loaded)})")
            loaded = loaded[split]
        return records_from_dicts(loaded, str(path))
    return records_from_dicts(datasets.load_dataset(str(source), split=split), f"hub:{source}")


def save_alpaca_json(records: Iterable[AlpacaRecord], path: str | Path) -> Path:
    """Write records as an ``alpaca_data.json``-style JSON list that :func:`load_alpaca` reads back."""
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    path = Path(path)
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))
    return path
