"""Files on disk, written so a crash never leaves a half-written one: atomic writes, JSON reading, hashing.

One rule carries crash safety everywhere in lgeo: nothing gets its final name until it is fully written.
A file goes through a temp file in the same directory, fsync, `os.replace`; a directory is built as
`name.tmp-XXXX` and renamed when complete. Leftovers of an interrupted write carry `.tmp-` in their name
and are removed by `remove_temporaries`. Files and directories get the permissions an ordinary `open` /
`mkdir` would give (0644 / 0755 under the usual umask), not `tempfile`'s private 0600 / 0700: figures,
configs and exports are for people and other tools to read.

Also here, because every stage relies on them: an OS lock on a directory (one writer per run directory),
a barrier that waits until nothing writes into a directory any more (before a rollback touches it), and
content fingerprints of input files and directories (stale detection).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
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


# ---- one writer per directory -------------------------------------------------------------------

LOCK_NAME = ".lgeo.lock"
_HELD: set[str] = set()  # realpaths of the directories this process has locked (the lock is re-entrant)


class DirectoryBusy(OSError):
    """Another process holds the directory's lock; the message names the holder (pid, host, command)."""


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike, *, purpose: str = "") -> Iterator[Path]:
    """Holds an exclusive OS lock (`flock`) on `directory/.lgeo.lock` for the block's life; creates `directory`.

    A second process (or host, where the filesystem supports flock) gets `DirectoryBusy` at once, naming the
    holder's pid, host and `purpose`. The kernel drops the lock when the holder exits, however it dies, so a
    killed run never leaves a stale lock. Re-entrant within one process; the lock file itself stays (removing
    it would let two processes lock two different files of the same name).
    """
    directory = Path(directory)
    key = os.path.realpath(directory)
    if key in _HELD:  # an outer block of this process holds it, and releases it
        yield directory
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusy(f"{directory} is in use by {_holder(fd)}; wait for it to finish or use another "
                                "directory") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _HELD.add(key)
        try:
            yield directory
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def lock_holder(directory: str | os.PathLike) -> str | None:
    """Who holds `directory`'s lock ("pid 123 on host h (lgeo run ..., since ...)"), or None if nobody does."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        what = ", ".join(x for x in (info.get("purpose"), f"since {info['since']}") if x)
        return f"pid {info['pid']} on host {info['host']} ({what})"
    except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its name
        return "another process (it has not written its pid yet)"


# ---- waiting for writers, removing trees --------------------------------------------------------


def wait_until_quiet(directory: str | os.PathLike, *, settle: float = 0.5, timeout: float = 300.0) -> None:
    """Returns once nothing in this process writes under `directory`: no open file of this process inside it
    (Linux `/proc/self/fd`) and no file created, resized, touched or removed for `settle` seconds.

    For a rollback after a failure: asynchronous writers the failure did not stop (tensorstore's I/O
    threads, orbax's save thread) finish or fail within moments, and deleting or renaming the directory
    under them would race them. Raises TimeoutError after `timeout` seconds of continued activity.
    """
    directory = os.path.realpath(directory)
    deadline = time.monotonic() + timeout
    last, quiet_since = None, time.monotonic()
    while True:
        now = time.monotonic()
        state = (_tree_state(directory), _open_files_under(directory))
        if state != last or state[1]:
            last, quiet_since = state, now
        elif now - quiet_since >= settle:
            return
        if now > deadline:
            raise TimeoutError(f"{directory}: still being written after {timeout:.0f} s")
        time.sleep(min(0.05, settle / 4))


def _tree_state(root: str) -> frozenset:
    state = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                state.add((path, st.st_size, st.st_mtime_ns))
    return frozenset(state)


def _open_files_under(root: str) -> bool:
    if not sys.platform.startswith("linux"):
        return False  # no /proc: the settle time alone decides
    prefix = root.rstrip("/") + "/"
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                return True
    return False


def remove_tree(path: str | os.PathLike, *, attempts: int = 5) -> None:
    """`shutil.rmtree`, retried while files still appear in it (a writer finishing); missing is fine."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


# ---- fingerprints of inputs ---------------------------------------------------------------------

FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 1 << 20


def file_digest(path: str | os.PathLike, *, with_mtime: bool = False) -> str:
    """`size:sha256` of a file: the whole content up to `FULL_HASH_BYTES`, else its first and last MiB (which
    hold a safetensors / npz header and index, and differ between two trainings of the same architecture).
    `with_mtime` adds the modification time of a file too large to hash whole, so a large file rewritten in
    place with the same edges is still noticed (small files are judged by content alone: a copy is equal)."""
    h = hashlib.sha256()
    st = os.stat(path)
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return f"{st.st_size}:{h.hexdigest()}"
        h.update(f.read(EDGE_BYTES))
        f.seek(st.st_size - EDGE_BYTES)
        h.update(f.read(EDGE_BYTES))
    return f"{st.st_size}:{h.hexdigest()}" + (f":{st.st_mtime_ns}" if with_mtime else "")


def paths_fingerprint(paths: Sequence[str | os.PathLike], *, with_mtime: bool = False) -> str:
    """One hash over every file (relative name, `file_digest`) of the given files or directories, in order.
    Raises FileNotFoundError naming a path that does not exist."""
    h = hashlib.sha256()
    for path in paths:
        path = os.fspath(path)
        if os.path.isfile(path):
            h.update(b"\0file\0" + file_digest(path, with_mtime=with_mtime).encode())
            continue
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not found")
        h.update(b"\0dir\0")
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = os.path.join(root, name)
                h.update(os.path.relpath(file, path).encode() + b"\0" + file_digest(file, with_mtime=with_mtime)
                         .encode())
    return h.hexdigest()[:32]


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
