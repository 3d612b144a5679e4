"""The `lgeo` command line: plan numbers, error handling without tracebacks."""

import subprocess
import sys

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
    assert "24 delta + 6 base SAEs of 3584 -> 16384" in out


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
