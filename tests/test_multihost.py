"""`lgeo` over several processes: `--coordinator/--num-processes/--process-id` (and the LGEO_* env) bring up
`jax.distributed` over gloo; two local processes of 4 simulated CPU devices each extract the corpus of micro's
one-process adapters into the one store, each its share of the batches, and give the corpus one process of 4
devices gives (every array and its metadata identical: bf16 rounding or better, here float32 to the bit; the
statistics to float32 rounding of the per-batch sums, whose cross-device reduction runs over gloo in a
multi-process job); SIGKILL one of the two mid-corpus, the other stops on its own (no hang), and a rerun of
both gives the same corpus with every row once. Stages other than the corpus are refused in such a job, before
anything runs (their orbax checkpoints refuse process-local arrays; cross-host training is a further step).

Figures: the corpus being identical, the later stages (run in a one-process job) see the same input, so the
figures follow; the slow test checks them against an all-one-process run with tests/test_e2e_mesh.py's
tolerances."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lgeo_jax.cli import HEARTBEAT_S
from lgeo_jax.corpus import open_corpus
from tests.e2e import MICRO, REPO
from tests.test_e2e_mesh import assert_same_corpus, assert_same_figures

# A process whose every commit-log write is followed by a pause, so a kill lands mid-corpus (the parent kills on
# the log's progress); otherwise `lgeo` itself.
THROTTLED = """
import sys, time
from lgeo_jax.corpus import _writer
from lgeo_jax.cli import main

_write = _writer.atomic_write_json
def slow_write(path, value):
    _write(path, value)
    time.sleep(0.5)
_writer.atomic_write_json = slow_write
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}


def _one(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)


def _start(command: str, out: Path, *, throttled: bool = False) -> list[subprocess.Popen]:
    """Both processes of a job, one configured by flags, one by the environment."""
    port, procs = _free_port(), []
    for i in range(2):
        env = _env()
        args = [command, str(MICRO), "--out", str(out), "--coordinator", f"127.0.0.1:{port}"]
        if i == 0:
            args += ["--num-processes", "2", "--process-id", "0"]
        else:
            env.update(LGEO_NUM_PROCESSES="2", LGEO_PROCESS_ID="1")
        head = ["-c", THROTTLED] if throttled else ["-m", "lgeo_jax.cli"]
        procs.append(subprocess.Popen([sys.executable, *head, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # leave no process behind, whatever failed
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def _extract_on_two(out: Path) -> None:
    for i, (rc, out_text, err) in enumerate(_finish(_start("extract", out))):
        assert rc == 0, (i, out_text[-2000:], err[-3000:])
        assert f"backend cpu, 8 x cpu (4 local), process {i} of 2, mesh data=4,fsdp=1,model=1" in out_text
        assert "corpus    done" in out_text


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """micro's data, base and adapters, from a one-process job of 4 devices."""
    out = tmp_path_factory.mktemp("adapters") / "run"
    proc = _one("train-adapters", str(MICRO), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(adapters, tmp_path_factory) -> Path:
    """The corpus of `adapters` from a one-process job of 4 devices."""
    out = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(adapters, out)
    proc = _one("extract", str(MICRO), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(adapters: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(adapters, out)
    return out


def assert_same_corpus_exactly(one: Path, two: Path) -> None:
    """Every array and metadata field of the two corpora identical, every (sample, position) once, the
    statistics equal to float32 rounding of the per-batch sums, and the manifest recording every batch once
    with no commit log left."""
    assert_same_corpus(one, two)  # layout, metadata and arrays within test_e2e_mesh's tolerance ...
    a, b = (open_corpus(json.loads((r / "corpus" / "stats.json").read_text())["store"]) for r in (one, two))
    for split in a.layout.split_rows:
        for name in a.layout.names:
            for layer in a.layout.layers:  # ... and here to the bit
                np.testing.assert_array_equal(a.split_rows(split, name, layer), b.split_rows(split, name, layer))
        meta = b.meta(split)
        pairs = set(zip(meta["sample_index"].tolist(), meta["position"].tolist(), strict=True))
        assert len(pairs) == b.n_rows(split)  # no row twice
    sa, sb = (json.loads((r / "corpus" / "stats.json").read_text())["splits"] for r in (one, two))
    for split, arrays in sa.items():
        for name, layers in arrays.items():
            for layer, entry in layers.items():
                got = sb[split][name][layer]
                assert got["count"] == entry["count"]
                for key in ("norm_sum", "sq_sum", "mean_norm", "rms_scale"):
                    np.testing.assert_allclose(got[key], entry[key], rtol=1e-6, err_msg=f"{split} {name} {layer}")
    progress = json.loads((two / "corpus" / "manifest.json").read_text())["progress"]["corpus"]
    n_batches = {s: -(-len(set(b.meta(s)["sample_index"].tolist())) // 16) for s in b.layout.split_rows}
    assert progress["committed"] == n_batches and all(not v for v in progress["beyond"].values())
    assert not list((two / "corpus").glob("corpus-commits.*"))


@pytest.mark.slow  # the default set's kill-and-rerun test ends with the same two-process extraction and check
def test_two_processes_extract_the_corpus_one_process_does(tmp_path, adapters, one_process):
    out = _copy(adapters, tmp_path)
    _extract_on_two(out)
    assert_same_corpus_exactly(one_process, out)


def _kill_one_mid_corpus(out: Path, victim: int) -> None:
    """A throttled job, SIGKILLed in process `victim` once its commit log holds a batch; the other process must
    then stop by itself (the coordination service misses the victim's heartbeats) with an error."""
    procs = _start("extract", out, throttled=True)
    log = out / "corpus" / f"corpus-commits.p{victim}.json"
    deadline = time.monotonic() + 600
    try:
        while True:
            try:
                if json.loads(log.read_text())["batches"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                pytest.fail(f"no commit of process {victim} before the job ended: {_finish(procs, 5)}")
            time.sleep(0.02)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        survivor.wait(timeout=HEARTBEAT_S + 90)
        assert survivor.returncode != 0
        print(f"process {1 - victim} stopped {time.monotonic() - t0:.1f} s after process {victim} was killed")
    finally:
        _finish(procs, 5)
    progress = json.loads((out / "corpus" / "manifest.json").read_text())["progress"]["corpus"]
    committed = json.loads(log.read_text())["batches"]
    assert committed and sum(progress["committed"].values()) == 0  # killed before process 0 folded anything


def test_sigkill_of_one_process_mid_corpus_then_both_rerun(tmp_path, adapters, one_process):
    out = _copy(adapters, tmp_path)
    _kill_one_mid_corpus(out, victim=1)
    _extract_on_two(out)
    assert_same_corpus_exactly(one_process, out)


def test_a_job_of_two_processes_refuses_stages_it_cannot_share(tmp_path):
    for i, (rc, out, err) in enumerate(_finish(_start("run", tmp_path / "run"))):
        assert f"backend cpu, 8 x cpu (4 local), process {i} of 2, mesh data=4,fsdp=1,model=1" in out, (out, err)
        assert rc != 0 and "a job of 2 processes runs only the stages every process shares (corpus), but data, " \
            "base, adapters, saes" in err, err
        assert "run `lgeo train-adapters` in a one-process job first, then `lgeo extract` on every process" in err
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.slow
def test_killed_two_process_corpus_resumes_on_one_and_gives_the_same_figures(tmp_path, adapters, one_process):
    """Process 0 killed this time, the rerun on one process (it folds both commit logs), then both runs finished
    by `lgeo run` in one process: the same figures within test_e2e_mesh's tolerances."""
    out = _copy(adapters, tmp_path)
    _kill_one_mid_corpus(out, victim=0)
    proc = _one("run", str(MICRO), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_corpus_exactly(one_process, out)
    proc = _one("run", str(MICRO), "--out", str(one_process))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_figures(one_process, out)
