"""Bad input to `lgeo` on an existing run: non-zero exit, one clear message without a traceback, and every
existing result left exactly as it was."""

import hashlib
import json
import re
import shutil

import pytest
from e2e import MICRO, lgeo


def _snapshot(run_dir):
    """Hash of every result file (the log is not a result)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "lgeo.log" and ".jax_cache" not in p.parts}


def _real_checkpoint_config(tmp_path, checkpoint):
    """micro.yaml pointed at an HF checkpoint directory instead of the built-in model."""
    text = MICRO.read_text()
    text = re.sub(r"  checkpoint: builtin:tiny\n", f"  checkpoint: {checkpoint}\n", text)
    text = re.sub(r"  builtin:\n(    .*\n)+", "", text)
    path = tmp_path / "real.yaml"
    path.write_text(text)
    return path


def _case(name, run_dir, tmp_path):
    """(argv, expected message) for one bad input; may tamper with a copy of inputs (never the results)."""
    model = tmp_path / "model"
    if name in ("wrong_architecture", "corrupt_safetensors"):
        shutil.copytree(run_dir / "base" / "model", model)
    if name == "malformed_yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text(MICRO.read_text().replace("lora:\n", "lora:\n  ranks: [2, 4\n", 1))
        return ["run", str(bad), "--out", str(run_dir)], r"line \d+"
    if name == "unknown_key":
        bad = tmp_path / "bad.yaml"
        bad.write_text(MICRO.read_text().replace("sae:\n", "sae:\n  l1z: 0.1\n", 1))
        return ["run", str(bad), "--out", str(run_dir)], r"sae\.l1z.*unknown key"
    if name == "bad_types":
        return ["run", str(MICRO), "--out", str(run_dir), "--set", "lora.ranks=[two, 4]"], r"lora\.ranks"
    if name == "missing_checkpoint":
        cfg = _real_checkpoint_config(tmp_path, tmp_path / "nowhere")
        return ["run", str(cfg), "--out", str(run_dir)], r"model\.checkpoint.*not found"
    if name == "wrong_architecture":
        hf = json.loads((model / "config.json").read_text())
        hf["model_type"] = "llama"
        (model / "config.json").write_text(json.dumps(hf))
        return ["run", str(_real_checkpoint_config(tmp_path, model)), "--out", str(run_dir)], \
            r"model_type is 'llama'"
    if name == "corrupt_safetensors":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        return ["run", str(_real_checkpoint_config(tmp_path, model)), "--out", str(run_dir)], \
            r"model\.safetensors: truncated safetensors file"
    if name == "truncated_corpus":
        chunk = max((p for p in (run_dir / "corpus" / "store" / "probe").rglob("*") if p.is_file() and "c" in p.parts),
                    key=lambda p: p.stat().st_size)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        return ["train-saes", str(MICRO), "--out", str(run_dir), "--force", "saes"], r"corpus|store|chunk"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["malformed_yaml", "unknown_key", "bad_types", "missing_checkpoint",
                                  "wrong_architecture", "corrupt_safetensors", "truncated_corpus"])
def test_bad_input_leaves_results_untouched(micro_run, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir)
    argv, message = _case(name, run_dir, tmp_path)
    before = _snapshot(run_dir)
    proc = lgeo(*argv)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("lgeo: error:") == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert _snapshot(run_dir) == before
