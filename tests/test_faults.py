"""Faults around a finished run: a second `lgeo run` on the same directory, SIGTERM during a forced rerun, a disk
that fills up during a forced rerun, and inputs changed on disk. None may lose or corrupt a finished result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from e2e import MICRO, REPO, lgeo
from test_e2e_bad_input import _snapshot
from test_e2e_resume import _assert_same_figures

from lgeo_jax.files import lock_holder


def _popen(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _leftovers(run_dir):
    return [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_a_second_run_on_the_same_directory_is_refused_at_once(micro_run, tmp_path):
    out = tmp_path / "run"
    first = _popen("run", str(MICRO), "--out", str(out))
    try:
        while lock_holder(out) is None:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        second = lgeo("run", str(MICRO), "--out", str(out), "--set", "sae.l1=0.3")  # another config, same directory
        seconds = time.monotonic() - t0
        assert second.returncode == 2, second.stderr
        assert f"{out} is in use by pid {first.pid} on host" in second.stderr and "lgeo run" in second.stderr
        assert seconds < 30  # the time to start Python and read the config: it never waits for the first run
        status = lgeo("status", str(MICRO), "--out", str(out))  # reading still works
        assert status.returncode == 0 and f"in use: pid {first.pid}" in status.stdout, status.stderr
    finally:
        stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    _assert_same_figures(out, micro_run)  # the first run completed as if alone
    assert "l1: null" in (out / "config.yaml").read_text()


def test_sigterm_during_a_forced_rerun_restores_the_previous_output(micro_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    before = _snapshot(out)
    old = json.loads((out / "corpus" / "manifest.json").read_text())["instance"]
    proc = _popen("run", str(MICRO), "--out", str(out), "--force", "corpus")
    try:
        while proc.poll() is None:  # SIGTERM once the new attempt has committed batches of its own
            try:
                manifest = json.loads((out / "corpus" / "manifest.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                manifest = {}
            if manifest.get("instance") not in (None, old) and manifest.get("progress", {}).get("corpus"):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
    finally:
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "lgeo: terminated (SIGTERM); rerun the same command to resume" in stderr
    assert _snapshot(out) == before and _leftovers(out) == []
    again = lgeo("run", str(MICRO), "--out", str(out))
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 9, again.stdout


def _tmpfs_namespace() -> bool:
    """Whether this machine lets us mount a small tmpfs in a private mount namespace (no root needed)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
         "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True).returncode == 0


SNAPSHOT = """
import hashlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
                  if p.is_file() and p.name not in ("lgeo.log", ".lgeo.lock") and ".jax_cache" not in p.parts}))
"""


@pytest.mark.skipif(not _tmpfs_namespace(), reason="needs unshare and tmpfs in a user namespace")
def test_disk_full_during_a_forced_rerun_restores_the_previous_output_exactly(micro_run, tmp_path):
    """On a real filesystem that fills up (a tmpfs with 3 MB free, less than the corpus rerun writes): the resource
    check refuses the forced corpus rerun up front; overridden, the rerun fails with ENOSPC while tensorstore
    writes are in flight, and the rollback puts the finished corpus back exactly; the next run finds every
    stage complete."""
    mnt, res = tmp_path / "mnt", tmp_path / "results"
    mnt.mkdir()
    res.mkdir()
    (tmp_path / "snapshot.py").write_text(SNAPSHOT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size=512m tmpfs {mnt}
        cp -a {micro_run} {mnt}/run
        used=$(df -B1 --output=used {mnt} | tail -1)
        mount -o remount,size=$((used + 3 * 1024 * 1024)) {mnt}
        cd {REPO}
        {sys.executable} {tmp_path / 'snapshot.py'} {mnt}/run > {res}/before.json
        {sys.executable} -m lgeo_jax.cli run {MICRO} --out {mnt}/run --force corpus \
            > {res}/refused.out 2> {res}/refused.err
        echo $? > {res}/refused.rc
        {sys.executable} -m lgeo_jax.cli run {MICRO} --out {mnt}/run --force corpus --set resources.check=false \
            > {res}/forced.out 2> {res}/forced.err
        echo $? > {res}/forced.rc
        {sys.executable} {tmp_path / 'snapshot.py'} {mnt}/run > {res}/after.json
        ls -a {mnt}/run > {res}/ls.txt
        {sys.executable} -m lgeo_jax.cli run {MICRO} --out {mnt}/run > {res}/again.out 2> {res}/again.err
        echo $? > {res}/again.rc
        {sys.executable} {tmp_path / 'snapshot.py'} {mnt}/run > {res}/again.json
    """)
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    read = lambda name: (res / name).read_text()
    # the plan sees it first: refused before anything starts ...
    assert read("refused.rc").strip() == "2" and "this run does not fit this machine" in read("refused.err")
    # ... and told to go ahead anyway, the rerun fills the disk
    assert read("forced.rc").strip() == "2", read("forced.err")[-3000:]
    assert "No space left on device" in read("forced.err"), read("forced.err")[-3000:]
    before = json.loads(read("before.json"))
    assert json.loads(read("after.json")) == before  # the finished corpus, byte for byte
    assert not [n for n in read("ls.txt").split() if ".tmp-" in n]
    assert read("again.rc").strip() == "0", read("again.err")[-3000:]
    assert read("again.out").count("complete, skipped") == 9, read("again.out")
    again = json.loads(read("again.json"))
    assert again.pop("config.yaml") != before.pop("config.yaml")  # rewritten: it records the new run_dir
    assert again == before


def test_a_checkpoint_replaced_in_place_makes_its_readers_stale(micro_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    weights = out / "base" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # one weight changed, same size, same header
    weights.write_bytes(bytes(data))
    status = lgeo("status", str(MICRO), "--out", str(out))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert f"adapters: stale (base checkpoint ({out / 'base' / 'model'}) changed on disk since the stage ran)" in \
        lines[2]
    assert lines[3].startswith("corpus: stale (base checkpoint") and lines[4].startswith("saes: stale (input")
    assert lines[0] == "data: complete" and lines[1] == "base: complete"


def test_changing_the_gemma_scope_width_reruns_the_analysis_and_says_so(micro_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    proc = lgeo("run", str(MICRO), "--out", str(out), "--set", "analysis.gemma_scope_width=width_65k")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[saes] complete, skipped" in proc.stdout
    assert "[analysis] config section 'analysis' changed: rerunning ..." in proc.stdout
    assert "[report] input 'analysis' will rerun: rerunning ..." in proc.stdout
