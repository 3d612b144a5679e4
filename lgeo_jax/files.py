"""Files on disk, written so a crash never leaves a half-written one: atomic writes, JSON reading, hashing.

One rule carries crash safety everywhere in lgeo: nothing gets its final name until it is fully written.
A file goes through a temp file in the same directory, fsync, `os.replace`; a directory is built as
`name.tmp-XXXX` and renamed when complete. Leftovers of an interrupted write carry `.tmp-` in their name
and are removed by `remove_temporaries`. Files and directories get the permissions an ordinary `open` /
`mkdir` would give (0644 / 0755 under the usual umask), not `tempfile`'s private 0600 / 0700: figures,
configs and exports are for people and other tools to read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- atomic writes ------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that `path` holds either its old content or all of `data`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """Pretty, sorted JSON; NaN / Inf are refused (`allow_nan=False`), since no JSON reader accepts them."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh `path.tmp-XXXX` sibling to fill; renames it to `path` only if the block succeeds.

    On an exception the temp directory is removed; after a hard crash it stays behind under its
    temp name, which never looks complete. With `overwrite`, an existing `path` is replaced (moved
    aside under a temp name first, so at no moment does a half-old, half-new `path` exist).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}{TMP_MARK}"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """`np.savez` of `arrays`, written atomically (numpy is imported here only, for callers that need it)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """A matplotlib figure written atomically (rendered to memory, then `atomic_write_bytes`); the format is
    the file's suffix."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip("."), **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the leftovers of an unfinished atomic write (never a finished output)."""
    return TMP_MARK in Path(path).name


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Deletes unfinished atomic writes anywhere under `directory`; returns what was removed.

    Only for a directory no other process is writing into (stages call it when they resume).
    """
    removed = []
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [d for d in dirnames if is_temporary(d)]:
            shutil.rmtree(os.path.join(dirpath, name))
            removed.append(Path(dirpath, name))
            dirnames.remove(name)
        for name in filenames:
            if is_temporary(name):
                os.unlink(os.path.join(dirpath, name))
                removed.append(Path(dirpath, name))
    return sorted(removed)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Makes a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


# ---- reading and hashing JSON -------------------------------------------------------------------


def read_json(path: str | os.PathLike, *, needed_by: str) -> Any:
    """Parsed JSON at `path`; FileNotFoundError / ValueError naming the file and `needed_by` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; {needed_by} needs {os.path.basename(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def canonical_json(value: Any) -> str:
    """Deterministic JSON text of plain data: sorted keys, no whitespace, ASCII, no NaN (what gets hashed)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def json_hash(value: Any, digits: int = 16) -> str:
    """The first `digits` hex digits of SHA-256 over `canonical_json(value)`: equal data, equal hash."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:digits]
