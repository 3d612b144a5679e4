"""Atomic files and directories (`lgeo_jax.files`): a crash never leaves anything that looks complete."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from lgeo_jax.files import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temporary,
    remove_temporaries,
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
