"""`lgeo_jax.files`: atomic files and directories (a crash never leaves anything that looks complete), the
run-directory lock, the barrier before a rollback, and input fingerprints."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import lgeo_jax.files as files
from lgeo_jax.files import (
    DirectoryBusy,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temporary,
    lock_holder,
    locked_directory,
    remove_temporaries,
    wait_until_quiet,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- atomic files and directories ----------------------------------------------------------------


def test_atomic_writes_replace_content(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert json.loads(target.read_text()) == {"a": [1.5], "b": 1}
    atomic_write_text(target, "text")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temp files left


def test_failed_write_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _crash_between_write_and_rename(code: str, cwd: pathlib.Path) -> None:
    """Runs `code` in a fresh interpreter whose os.replace kills the process (a power cut)."""
    prelude = "import os\nos.replace = lambda *a: os._exit(17)\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr.decode()


def test_crash_during_file_write_leaves_nothing_that_looks_complete(tmp_path):
    (tmp_path / "stage").mkdir()
    _crash_between_write_and_rename(
        """
        from lgeo_jax.files import atomic_write_json
        atomic_write_json("stage/manifest.json", {"status": "complete"})
    """,
        tmp_path,
    )
    entries = list((tmp_path / "stage").iterdir())
    assert not (tmp_path / "stage" / "manifest.json").exists()
    assert len(entries) == 1 and is_temporary(entries[0])  # the fully written temp, under a temp name
    assert json.loads(entries[0].read_text()) == {"status": "complete"}
    assert remove_temporaries(tmp_path) == entries
    assert list((tmp_path / "stage").iterdir()) == []


def test_crash_while_building_a_directory_leaves_only_a_temp_name(tmp_path):
    _crash_between_write_and_rename(
        """
        from lgeo_jax.files import atomic_directory
        with atomic_directory("sae_r4") as d:
            (d / "weights.bin").write_bytes(b"x" * 100)
    """,
        tmp_path,
    )
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith("sae_r4.tmp-") and is_temporary(entry)
    assert not (tmp_path / "sae_r4").exists()
    remove_temporaries(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_success_failure_and_overwrite(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "half.bin").write_bytes(b"1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(final):
            pass
    with atomic_directory(final, overwrite=True) as d:
        (d / "b.txt").write_text("v2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_people_read_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "# report")
        with atomic_directory(tmp_path / "export") as d:
            (d / "cfg.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755


# ---- the directory lock -----------------------------------------------------------------------------

_HOLD = """
import sys, time
from lgeo_jax.files import locked_directory
with locked_directory(sys.argv[1], purpose="lgeo run test.yaml"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder_process(directory, seconds=60.0):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_naming_the_holder_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    assert lock_holder(run) is None
    proc = _holder_process(run)
    try:
        holder = lock_holder(run)
        assert holder.startswith(f"pid {proc.pid} on host {socket.gethostname()} (lgeo run test.yaml, since ")
        with pytest.raises(DirectoryBusy, match=rf"{run} is in use by pid {proc.pid} on host .*lgeo run test.yaml"):
            with locked_directory(run):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # however the holder dies, the kernel drops its lock
        proc.wait()
    assert lock_holder(run) is None
    with locked_directory(run, purpose="second"):
        assert lock_holder(run).startswith(f"pid {os.getpid()} on host")  # seen by others as this process
        with locked_directory(run):  # re-entrant within one process
            assert "(second, since" in lock_holder(run)
        assert lock_holder(run) is not None  # the inner block did not release the outer lock
    assert lock_holder(run) is None


def test_lock_is_released_for_others_after_the_block(tmp_path):
    with locked_directory(tmp_path / "run"):
        pass
    assert lock_holder(tmp_path / "run") is None
    proc = _holder_process(tmp_path / "run", seconds=0.1)  # another process can take it
    proc.wait()
    assert proc.returncode == 0


# ---- waiting for writers ------------------------------------------------------------------------------


def test_wait_until_quiet_returns_only_after_the_last_write(tmp_path):
    stop_at = time.monotonic() + 1.0
    last = []

    def writer():  # an asynchronous writer the caller's failure did not stop
        i = 0
        while time.monotonic() < stop_at:
            (tmp_path / f"chunk{i}").write_bytes(b"x" * 100)
            last[:] = [time.monotonic()]
            i += 1
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    wait_until_quiet(tmp_path, settle=0.3)
    done = time.monotonic()
    thread.join()
    assert done >= last[0] + 0.3  # it waited out the writer, then the settle time


def test_wait_until_quiet_waits_for_an_open_file(tmp_path):
    opened, closed = threading.Event(), []

    def writer():
        with open(tmp_path / "big.bin", "wb") as f:  # open, but not changing size or mtime for a while
            f.write(b"x")
            f.flush()
            opened.set()
            time.sleep(1.0)
            closed.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    opened.wait()
    wait_until_quiet(tmp_path, settle=0.2)
    assert closed and time.monotonic() >= closed[0]
    thread.join()


def test_wait_until_quiet_times_out_on_a_writer_that_never_stops(tmp_path):
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            (tmp_path / "f").write_bytes(str(time.monotonic()).encode())
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with pytest.raises(TimeoutError, match="still being written after 1 s"):
            wait_until_quiet(tmp_path, settle=0.3, timeout=1.0)
    finally:
        stop.set()
        thread.join()


# ---- fingerprints -------------------------------------------------------------------------------------


def test_fingerprints_see_content_and_for_large_files_mtime(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "w.bin").write_bytes(b"a" * 4096)
    fp = files.paths_fingerprint([d], with_mtime=True)
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)  # new mtimes, same content: small files are judged by content alone
    assert files.paths_fingerprint([copy], with_mtime=True) == fp
    (d / "w.bin").write_bytes(b"a" * 2048 + b"b" + b"a" * 2047)  # same size, one byte in the middle
    assert files.paths_fingerprint([d], with_mtime=True) != fp
    assert files.paths_fingerprint([d / "config.json"]) != files.paths_fingerprint([d])

    monkeypatch.setattr(files, "FULL_HASH_BYTES", 1024)  # w.bin is now "large": edges + size (+ mtime)
    monkeypatch.setattr(files, "EDGE_BYTES", 512)
    before = files.paths_fingerprint([d], with_mtime=True)
    content_only = files.paths_fingerprint([d])
    os.utime(d / "w.bin", ns=(1, 1))  # rewritten in place with the same edges: only mtime tells
    assert files.paths_fingerprint([d]) == content_only
    assert files.paths_fingerprint([d], with_mtime=True) != before
    with pytest.raises(FileNotFoundError, match="nowhere: not found"):
        files.paths_fingerprint([tmp_path / "nowhere"])
