"""`lgeo` over several processes: `--coordinator/--num-processes/--process-id` (and the LGEO_* env) bring up
`jax.distributed` over gloo before any device is touched, every process reports the global devices; stage runs
over several processes are refused (not built yet: one writer per run directory), before the run directory
is touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.e2e import MICRO, REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_initialise_jax_distributed_and_are_refused_clearly(tmp_path):
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}
        args = ["run", str(MICRO), "--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}"]
        if i == 0:  # one by flags, one by environment
            args += ["--num-processes", "2", "--process-id", "0"]
        else:
            env.update(LGEO_NUM_PROCESSES="2", LGEO_PROCESS_ID="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "lgeo_jax.cli", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert f"backend cpu, 8 x cpu (4 local), process {i} of 2, mesh data=8,fsdp=1,model=1" in out, (out, err)
        assert p.returncode == 2 and "2 processes: multi-process stage runs are not supported yet" in err, err
    assert not (tmp_path / "run").exists()
