"""The loader never holds the checkpoint twice: peak anonymous host memory while loading stays at the model
plus a few tensors.

On CPU the loaded model itself lives in host memory, so the bound is model bytes + 4 of the largest tensor +
64 MiB for XLA compiling the per-shape fill kernels during the load. Reading the whole checkpoint first (what
`safetensors.numpy.load_file` + `device_put` does) needs about twice the model, which this bound excludes.
Memory-mapped file pages are page cache (RssFile), reclaimable, and not counted.
"""

import subprocess
import sys
import textwrap

import lgeo_jax
from lgeo_jax.model import Gemma2Config, alternating_layer_types

PROBE = """
import sys, threading, time, jax
import lgeo_jax

def rss(field):
    status = open("/proc/self/status").read()
    return int(status.split(field + ":")[1].split()[0]) * 1024

# warm up JAX and the loader on a tiny checkpoint first, so the measurement sees the load itself
tiny = lgeo_jax.Gemma2Config(vocab_size=8, d_model=8, n_heads=1, n_kv_heads=1, head_dim=8, mlp_dim=8,
                             layer_types=("full_attention",))
lgeo_jax.save_model(lgeo_jax.init_model(tiny), sys.argv[2])
lgeo_jax.load_model(sys.argv[2])
peak, done = [0], [False]

def poll():
    while not done[0]:
        peak[0] = max(peak[0], rss("RssAnon"))
        time.sleep(0.001)

thread = threading.Thread(target=poll)
before = rss("RssAnon")
thread.start()
model = lgeo_jax.load_model(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
done[0] = True
thread.join()
print(peak[0] - before)
"""


def test_peak_anonymous_memory_is_model_plus_a_few_tensors(tmp_path):
    cfg = Gemma2Config(vocab_size=512, d_model=512, n_heads=8, n_kv_heads=4, head_dim=64, mlp_dim=4096,
                       layer_types=alternating_layer_types(12), query_pre_attn_scalar=64)
    lgeo_jax.save_model(lgeo_jax.init_model(cfg, seed=0), tmp_path / "model", max_shard_bytes=64 << 20)
    model_bytes = 4 * lgeo_jax.count_params(lgeo_jax.abstract_model(cfg))  # 325 MiB in 12 x 11 tensors
    largest = 4 * 512 * 4096  # one MLP projection of one layer (HF stores each layer's tensors separately)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(tmp_path / "model"),
                           str(tmp_path / "warm")], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.split()[-1])
    assert growth <= model_bytes + 4 * largest + (64 << 20), (growth / 2**20, model_bytes / 2**20)
    assert growth >= model_bytes * 0.9  # the probe does see the model arrive
