"""The in-package sharding across processes: two local JAX processes with 4 simulated CPU devices each
(gloo collectives, `jax.distributed`) build one 8-device mesh, train LoRA, take gradients, evaluate and
extract residuals on it, and get what one device gets (tolerances and their reasons: `test_sharding`)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_sharding import single_device

TESTS = pathlib.Path(__file__).resolve().parent

CHILD = """
import json, os, sys
process_id, port = int(sys.argv[1]), int(sys.argv[2])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
sys.path.insert(0, sys.argv[3])
import numpy as np
import test_sharding as ts
from lgeo_jax.sharding import MeshConfig
mesh = MeshConfig(data=2, fsdp=2, model=2).build()
assert jax.device_count() == 8 and jax.local_device_count() == 4 and jax.process_count() == 2
train = ts.PARTS["train"](mesh)
loss, grads = ts.PARTS["grads"](mesh)
heldout = ts.PARTS["heldout"](mesh)
h = ts.PARTS["residuals"](mesh)
# each process holds the batch rows of its own devices: report them by their global row range
rows = {}
for shard in h.addressable_shards:
    rows[f"{shard.index[2].start}:{shard.index[2].stop}"] = np.asarray(shard.data).tolist()
print("RESULT " + json.dumps({"losses": train.losses.tolist(), "grad_loss": loss.tolist(),
                              "grads": {t: {p: g.tolist() for p, g in f.items()} for t, f in grads.items()},
                              "heldout": [heldout.base_loss, *heldout.adapter_loss], "rows": rows}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_one_mesh_and_match_one_device(tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    # output to files, not pipes: a child blocked on a full pipe would stall the other at the shutdown barrier
    logs = [(tmp_path / f"p{i}.out", tmp_path / f"p{i}.err") for i in range(2)]
    children = []
    for i, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:  # the child keeps its own copies
            children.append(subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(port), str(TESTS)], env=env,
                                             stdout=stdout, stderr=stderr))
    results = []
    for child, (out, err) in zip(children, logs, strict=True):
        assert child.wait(timeout=600) == 0, err.read_text()[-3000:]
        lines = out.read_text().splitlines()
        results.append(json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):]))
    ref_train, (ref_loss, ref_grads) = single_device("train"), single_device("grads")
    ref_h = np.asarray(single_device("residuals"))
    covered = set()
    for got in results:
        np.testing.assert_allclose(got["losses"], ref_train.losses, rtol=1e-6)
        np.testing.assert_allclose(got["grad_loss"], ref_loss, rtol=1e-6)
        for t, factors in ref_grads.items():
            for part, g in factors.items():
                want = np.asarray(g, np.float64)
                assert np.linalg.norm(np.asarray(got["grads"][t][part]) - want) < 1e-5 * np.linalg.norm(want)
        ev = single_device("heldout")
        np.testing.assert_allclose(got["heldout"], [ev.base_loss, *ev.adapter_loss], rtol=1e-6)
        for span, values in got["rows"].items():
            start, stop = map(int, span.split(":"))
            assert np.abs(np.asarray(values) - ref_h[:, :, start:stop]).max() < 5e-6 * np.abs(ref_h).max()
            covered.update(range(start, stop))
    assert covered == set(range(ref_h.shape[2]))  # together the two processes hold every batch row


LOAD_CHILD = """
import json, sys
process_id, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import lgeo_jax
from lgeo_jax.model import CheckpointError
from lgeo_jax.sharding import MeshConfig
try:
    model = lgeo_jax.load_model(path, mesh=MeshConfig(fsdp=8).build())
except CheckpointError as error:
    print("RESULT " + json.dumps({"error": str(error)}))
else:
    cols = sorted({(s.index[1].start, s.index[1].stop) for s in model.embed[...].addressable_shards})
    print("RESULT " + json.dumps({"embed_columns": cols}))
"""


def test_each_process_reads_only_the_bytes_of_its_own_shards(tmp_path):
    """A NaN planted in one column of the embedding, sharded over 8 devices of 2 processes: the process whose
    devices hold that column reports the tensor, the other loads without error — it never read those bytes."""
    from safetensors.numpy import load_file, save_file

    import lgeo_jax
    from lgeo_jax.model import Gemma2Config

    cfg = Gemma2Config(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                       layer_types=("full_attention",))
    lgeo_jax.save_model(lgeo_jax.init_model(cfg), tmp_path / "model")
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    bad_column = 30
    tensors["model.embed_tokens.weight"][5, bad_column] = np.nan
    save_file(tensors, tmp_path / "model" / "model.safetensors")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    children = [subprocess.Popen([sys.executable, "-c", LOAD_CHILD, str(i), str(port), str(tmp_path / "model")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    failed = [r for r in results if "error" in r]
    loaded = [r for r in results if "embed_columns" in r]
    assert len(failed) == len(loaded) == 1, results
    assert "tensor 'model.embed_tokens.weight' contains NaN" in failed[0]["error"]
    assert all(not start <= bad_column < stop for start, stop in loaded[0]["embed_columns"])
    assert sum(stop - start for start, stop in loaded[0]["embed_columns"]) == cfg.d_model // 2  # half the columns
