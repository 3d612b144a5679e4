"""Bad and hostile input to `lgeo` on an existing run: exit 2, one clear line naming the file and the field (no
traceback), and every existing result file exactly as it was. The cases are those of a careless user and of
an attacker: malformed configs, checkpoints whose safetensors headers lie, shard indexes that point outside the
checkpoint, config values that would become paths outside the run, non-zip npz dictionaries, Alpaca records of
the wrong type, adapter configs with list-typed fields, NaN weights; and a user's own folder where a stage's
output would go."""

import hashlib
import json
import re
import shutil
import struct

import numpy as np
import pytest
from e2e import MICRO, lgeo

from lgeo_jax.safetensors_io import read_safetensors, write_safetensors

NOT_RESULTS = ("lgeo.log", ".lgeo.lock")  # the log and the lock file change on every command


def _snapshot(run_dir):
    """Hash of every result file."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in NOT_RESULTS and ".jax_cache" not in p.parts}


def _real_checkpoint_config(tmp_path, checkpoint):
    """micro.yaml pointed at an HF checkpoint directory instead of the built-in model."""
    text = MICRO.read_text()
    text = re.sub(r"  checkpoint: builtin:tiny\n", f"  checkpoint: {checkpoint}\n", text)
    text = re.sub(r"  builtin:\n(    .*\n)+", "", text)
    path = tmp_path / "real.yaml"
    path.write_text(text)
    return path


def _edit_header(path, edit):
    """Rewrites a safetensors file's JSON header with `edit(header) -> header`, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _set_entry(name, key, value):
    def edit(header):
        header[name][key] = value
        return header
    return edit


def _with_nan(path, name=None):
    tensors = read_safetensors(path)
    name = name or sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    write_safetensors(path, tensors)
    return name


def _case(name, run_dir, tmp_path):
    """(argv, regex the error line must match); may tamper with inputs (a checkpoint copy, a run's adapter)."""
    run = ["run", str(MICRO), "--out", str(run_dir)]
    model = tmp_path / "model"
    if name.startswith(("st_", "index_")) or name in ("wrong_architecture", "corrupt_safetensors"):
        shutil.copytree(run_dir / "base" / "model", model)
        run = ["run", str(_real_checkpoint_config(tmp_path, model)), "--out", str(run_dir)]
    weights = model / "model.safetensors"
    if name == "malformed_yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text(MICRO.read_text().replace("lora:\n", "lora:\n  ranks: [2, 4\n", 1))
        return ["run", str(bad), "--out", str(run_dir)], rf"{bad}.*line \d+"
    if name == "unknown_key":
        bad = tmp_path / "bad.yaml"
        bad.write_text(MICRO.read_text().replace("sae:\n", "sae:\n  l1z: 0.1\n", 1))
        return ["run", str(bad), "--out", str(run_dir)], rf"{bad}.*sae\.l1z.*unknown key"
    if name == "bad_types":
        return [*run, "--set", "lora.ranks=[two, 4]"], r"lora\.ranks"
    if name == "missing_checkpoint":
        cfg = _real_checkpoint_config(tmp_path, tmp_path / "nowhere")
        return ["run", str(cfg), "--out", str(run_dir)], r"model\.checkpoint.*nowhere.*not found"
    if name == "wrong_architecture":
        hf = json.loads((model / "config.json").read_text())
        hf["model_type"] = "llama"
        (model / "config.json").write_text(json.dumps(hf))
        return run, rf"{model / 'config.json'}: model_type is 'llama'"
    if name == "hf_config_list_field":
        shutil.copytree(run_dir / "base" / "model", model)
        hf = json.loads((model / "config.json").read_text())
        hf["num_hidden_layers"] = [2]
        (model / "config.json").write_text(json.dumps(hf))
        return ["run", str(_real_checkpoint_config(tmp_path, model)), "--out", str(run_dir)], \
            rf"{model / 'config.json'}.*'num_hidden_layers'.*expected an integer, got \[2\]"
    if name == "corrupt_safetensors":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return run, rf"{weights}: truncated safetensors file"
    if name == "st_negative_offsets":  # would read header bytes as the final norm's weights
        _edit_header(weights, _set_entry("model.norm.weight", "data_offsets", [-8, 120]))
        return run, rf"{weights}: tensor 'model.norm.weight': data_offsets \[-8, 120\]"
    if name == "st_header_list":
        _edit_header(weights, lambda header: [header])
        return run, rf"{weights}: safetensors header is a list"
    if name == "st_entry_int":
        _edit_header(weights, lambda header: {**header, "model.norm.weight": 5})
        return run, rf"{weights}: tensor 'model.norm.weight': header entry is not a JSON object"
    if name == "st_no_shape":
        def drop_shape(header):
            del header["model.norm.weight"]["shape"]
            return header
        _edit_header(weights, drop_shape)
        return run, rf"{weights}: tensor 'model.norm.weight': shape None"
    if name in ("index_outside", "index_list"):
        shard = "model-00001-of-00001.safetensors"
        weights.rename(model / shard)
        names = sorted(read_safetensors(model / shard))
        weight_map = {n: shard for n in names}
        outside = tmp_path / "outside"
        outside.mkdir()
        shutil.copy(model / shard, outside / "x.safetensors")  # a real file there: it must not be read
        weight_map["model.norm.weight"] = "../../outside/x.safetensors"
        index = model / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": weight_map if name == "index_outside" else list(weight_map)}))
        if name == "index_outside":
            return run, rf"{index}: weight_map\['model.norm.weight'\] = '../../outside/x.safetensors' is not a file " \
                        "name inside the checkpoint directory"
        return run, rf"{index}: not a safetensors index .*'weight_map'"
    if name == "gemma_scope_width_escape":
        return [*run, "--set", "analysis.gemma_scope_width=../../../../X"], \
            r"analysis\.gemma_scope_width.*'\.\./\.\./\.\./\.\./X'"
    if name == "npz_not_zip":
        scope = tmp_path / "gemma-scope"
        for layer in (0, 1):
            params = scope / f"layer_{layer}" / "width_16k" / "average_l0_5" / "params.npz"
            params.parent.mkdir(parents=True)
            params.write_bytes(b"not a zip archive\n" * 10)
        return [*run, "--set", f"analysis.gemma_scope_dir={scope}", "--set", "analysis.gemma_scope_l0={0: 5, 1: 5}"], \
            rf"{scope}/layer_0/width_16k/average_l0_5/params.npz: not a readable Gemma Scope params.npz"
    if name == "sae_nan":
        sae = tmp_path / "my_sae"
        shutil.copytree(run_dir / "saes" / "job" / "saes" / "base_L0_s0", sae)
        tensor = _with_nan(sae / "params.safetensors", "W_dec")
        return [*run, "--set", f"analysis.dictionary_dirs={{0: {sae}}}"], \
            rf"{sae / 'params.safetensors'}: tensor\(s\) \['{tensor}'\] contain NaN or Inf"
    if name == "alpaca_int_instruction":
        source = tmp_path / "alpaca.json"
        source.write_text(json.dumps([{"instruction": "fine", "input": "", "output": "x"},
                                      {"instruction": 5, "input": "", "output": "x"}]))
        shutil.copytree(run_dir / "data" / "tokenizer", tmp_path / "tokenizer")
        return [*run, "--set", f"data.source={source}", "--set", "data.n_records=null",
                "--set", f"data.tokenizer={tmp_path / 'tokenizer'}"], \
            rf"{source}: record 1 field 'instruction' is int, expected str"
    if name == "peft_list_fields":  # a run's adapter edited in place: the corpus that reads it is stale
        cfg_path = run_dir / "adapters" / "r2" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["r"] = [2]
        cfg_path.write_text(json.dumps(cfg))
        return run, rf"{cfg_path}: r: expected an integer, got \[2\]"
    if name == "lora_nan":
        weights = run_dir / "adapters" / "r4" / "adapter_model.safetensors"
        tensor = _with_nan(weights)
        return run, rf"{weights}: tensor {re.escape(tensor)} contains NaN or Inf"
    if name == "truncated_corpus":
        chunk = max((p for p in (run_dir / "corpus" / "store" / "probe").rglob("*") if p.is_file() and "c" in p.parts),
                    key=lambda p: p.stat().st_size)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        return ["train-saes", str(MICRO), "--out", str(run_dir), "--force", "saes"], r"corpus|store|chunk"
    raise AssertionError(name)


CASES = ["malformed_yaml", "unknown_key", "bad_types", "missing_checkpoint", "wrong_architecture",
         "hf_config_list_field", "corrupt_safetensors", "st_negative_offsets", "st_header_list", "st_entry_int",
         "st_no_shape", "index_outside", "index_list", "gemma_scope_width_escape", "npz_not_zip", "sae_nan",
         "alpaca_int_instruction", "peft_list_fields", "lora_nan", "truncated_corpus"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_leaves_results_untouched(micro_run, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir)
    argv, message = _case(name, run_dir, tmp_path)
    before = _snapshot(run_dir)
    proc = lgeo(*argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lgeo")]
    assert len(errors) == 1 and errors[0].startswith("lgeo: error: "), proc.stderr  # one line, nothing after it
    assert proc.stderr.rstrip("\n").endswith(errors[0])
    assert re.search(message, errors[0]), errors[0]
    assert _snapshot(run_dir) == before
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]  # no stage left set aside


def test_a_users_own_folders_where_stages_would_go_are_refused_and_kept(tmp_path):
    out = tmp_path / "U"
    (out / "data").mkdir(parents=True)
    (out / "data" / "my_dataset.csv").write_text("x\n")
    (out / "report").mkdir()
    (out / "report" / "draft.md").write_text("# draft\n")
    proc = lgeo("run", str(MICRO), "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.count("lgeo: error:") == 1 and "Traceback" not in proc.stderr
    assert f"{out / 'data'}, {out / 'report'}: not written by lgeo" in proc.stderr
    assert (out / "data" / "my_dataset.csv").read_text() == "x\n" and (out / "report" / "draft.md").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["data", "report"]  # nothing written: no log, no lock
