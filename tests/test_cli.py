"""The `lgeo` command line: plan numbers, error handling without tracebacks, refusals before any work."""

import re
import resource
import signal
import subprocess
import sys
import time

import pytest

from lgeo_jax.cli import main


def test_plan_paper_reports_table2_counts(capsys):
    assert main(["plan", "configs/paper.yaml"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 9,241,705,984" in out
    for count, pct in (("4,472,832", "0.0484%"), ("8,945,664", "0.0968%"), ("17,891,328", "0.1936%"),
                       ("35,782,656", "0.3872%")):
        assert f"{count} = {pct}" in out
    # 1M token vectors x 3584 x 2 bytes (bf16) per (adapter, layer) array
    assert f"{1_000_000 * 3584 * 2 / 1e9:,.2f} GB per (adapter, layer) array" in out
    from lgeo_jax.study import load_config

    c = load_config("configs/paper.yaml")  # 4 ranks x 6 layers x the seeds, and a base SAE per layer and seed
    n_delta, n_base = len(c.lora.ranks) * len(c.extract.layers) * len(c.sae.seeds), 6 * len(c.sae.seeds)
    assert f"{n_delta} delta + {n_base} base SAEs of 3584 -> 16384" in out


def test_plan_builtin_counts_match_the_model(capsys):
    import lgeo_jax
    from lgeo_jax.study import load_config

    assert main(["plan", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    model = lgeo_jax.init_model(load_config("configs/tiny.yaml").model.builtin.with_vocab(1024))
    assert f"parameters: {lgeo_jax.count_params(model):,}" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "configs/does_not_exist.yaml"], "cannot read the config file"),
    (["plan", "configs/tiny.yaml", "--set", "lora.ranks=[0, 4]"], "lora.ranks"),
    (["run", "configs/tiny.yaml", "--out", "{tmp}", "--force", "nonsense"], "unknown stage 'nonsense'"),
    (["plan", "configs/micro.yaml", "--set", "sae.l1_sweep=[]"], "null means 'pick from sae.l1_sweep"),
])
def test_bad_input_one_message_no_traceback(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "lgeo_jax.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("lgeo: error:") == 1


def test_billion_laughs_yaml_is_refused_in_under_a_second(tmp_path, capsys):
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")  # 9^9 strings if expanded
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert path.stat().st_size < 1100
    from lgeo_jax.config import ConfigError
    from lgeo_jax.study import load_config

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML alias"):
        load_config(path)
    assert time.perf_counter() - t0 < 1.0  # refused while parsing, before anything is expanded
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"lgeo: error: {path}: 1 problem: <top level> (line 2): YAML alias '*a' found" in err


def test_an_sae_that_cannot_fit_is_refused_before_any_work(tmp_path):
    """`sae.width: 4e9` used to fail after ~100 s of work with an MLIR error or an OOM; now `lgeo run` refuses it
    with the planned size and what would fit, in under 5 s of CPU (the imports and the config included)."""
    out = tmp_path / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lgeo_jax.cli", "run", "configs/micro.yaml", "--out", str(out),
                           "--set", "sae.width=4e9"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("lgeo: error:") == 1 and "Traceback" not in proc.stderr
    assert re.search(r"stage saes needs at least [\d,.]+ GiB per device \(\d+ device\(s\)\) for training 6 SAEs of "
                     r"width 4,000,000,000 .*; an SAE width of at most [\d,]+ would fit", proc.stderr), proc.stderr
    assert "Set resources.check=false to try anyway" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lgeo.lock", "lgeo.log"]  # no stage started
    assert cpu < 5.0, f"{cpu:.1f} s of CPU ({wall:.1f} s wall)"


WEDGED = """
import ctypes, signal
import lgeo_jax.cli as cli
cli.TERM_GRACE_S = 0.5
with cli._sigterm_handled():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the main thread never runs the Python handler
    print("ready", flush=True)
    ctypes.CDLL(None).sleep(120)  # native code that does not return to Python
"""


def test_sigterm_ends_a_command_stuck_in_native_code_after_the_grace_time():
    proc = subprocess.Popen([sys.executable, "-c", WEDGED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and time.perf_counter() - t0 < 30  # ended as a SIGKILL would
    assert "lgeo: still running 0 s after SIGTERM; exiting now (rerun the same command to resume)" in err
