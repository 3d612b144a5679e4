"""The TPU and GPU launchers (scripts/tpu/launch.py, scripts/gpu/launch.py), through --dry-run only: each
runs as a subprocess and the exact printed commands are checked. Expected values (layers, Gemma Scope L0s)
are read from the configs here, not through the launchers' own helpers. The remote scripts are also run
under `sh` against stub binaries, to check what they do, not only how they read."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "scripts" / "tpu" / "launch.py"
GPU = REPO / "scripts" / "gpu" / "launch.py"
PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
SOURCES = [str(REPO / name) for name in ("lgeo_jax", "pyproject.toml", "README.md", "configs")]
TOKEN_ENV = "LGEO_TEST_HF_TOKEN"


def launch(script: Path, *args: str, tmp: Path, token: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = "hf_not_a_real_token"
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def dry_run(script: Path, *args: str, tmp: Path, token: bool = True) -> tuple[list[str], str]:
    proc = launch(script, *args, "--dry-run", tmp=tmp, token=token)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines(), proc.stderr


def simple_commands(script: str) -> list[list[str]]:
    """A remote script split into its simple commands (at && || ; & | and parentheses), each a word list."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "&", "|", "(", ")"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current] if current else commands


def find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in commands if c[: len(prefix)] == list(prefix)]


def includes(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == "--include"]


def expected_includes(config: dict, layers: list[int] | None = None) -> list[str]:
    analysis = config["analysis"]
    layers = config["extract"]["layers"] if layers is None else layers
    return [f"layer_{layer}/{analysis['gemma_scope_width']}/average_l0_{analysis['gemma_scope_l0'][layer]}/*"
            for layer in layers]


def test_paper_config_layers_and_l0():
    # The numbers the launchers' Gemma Scope patterns are built from (docs/conventions.md, "Formats").
    l0 = PAPER["analysis"]["gemma_scope_l0"]
    assert PAPER["extract"]["layers"] == [5, 10, 18, 22, 32, 38]
    assert [l0[layer] for layer in PAPER["extract"]["layers"]] == [77, 113, 71, 123, 111, 128]
    assert expected_includes(PAPER)[0] == "layer_5/width_16k/average_l0_77/*"


def test_tpu_single_host_all(tmp_path):
    lines, _ = dry_run(TPU, "all", "--name", "lgeo-test", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8",
                       "--config", "configs/paper.yaml", "--set", "sae.l1=0.1", "--hf-token-env", TOKEN_ENV,
                       tmp=tmp_path)
    argvs = [shlex.split(line) for line in lines]
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    loc = ["--zone", "us-west4-a"]
    assert argvs[0] == [*gcloud, "create", "lgeo-test", *loc, "--accelerator-type", "v5litepod-8",
                        "--version", "v2-alpha-tpuv5-lite"]
    token = str(tmp_path / "lgeo-hf-token-lgeo-test")
    assert argvs[2] == [*gcloud, "scp", *SOURCES, "lgeo-test:lgeo_jax", *loc, "--worker=all", "--recurse"]
    assert argvs[4] == [*gcloud, "scp", token, "lgeo-test:.lgeo/hf_token", *loc, "--worker=all"]
    assert not os.path.exists(token)  # a dry run writes nothing
    assert argvs[6] == [*gcloud, "scp", "configs/paper.yaml", "lgeo-test:.lgeo/configs/paper.yaml", *loc,
                        "--worker=all"]
    assert argvs[8:] == [["mkdir", "-p", "runs/lgeo-test"],
                         [*gcloud, "scp", "lgeo-test:lgeo_jax/runs/paper/report", "runs/lgeo-test", *loc,
                          "--worker=0", "--recurse"]]
    ssh = [a for a in argvs if a[:5] == [*gcloud, "ssh"]]
    assert [a[4:8] for a in ssh] == [["ssh", "lgeo-test", *loc]] * 4
    assert all(a[8:10] == ["--worker=all", "--command"] and len(a) == 11 for a in ssh)
    scripts = [simple_commands(a[10]) for a in ssh]
    assert scripts[0] == [["mkdir", "-p", "$HOME/lgeo_jax", "$HOME/.lgeo/configs", "$HOME/.lgeo/logs",
                           "$HOME/weights"]]
    assert find(scripts[1], "$HOME/lgeo-venv/bin/pip") == [
        ["$HOME/lgeo-venv/bin/pip", "install", "-U", "jax[tpu]", "-e", "$HOME/lgeo_jax"]]
    assert find(scripts[1], "uv", "venv") == [["uv", "venv", "--allow-existing", "--seed", "--python", "3.12",
                                               "$HOME/lgeo-venv"]]
    hf = find(scripts[2], "$HOME/lgeo-venv/bin/hf", "download")
    assert [c[2] for c in hf] == ["google/gemma-2-9b", "google/gemma-scope-9b-pt-res"]
    assert includes(hf[0]) == ["*.json", "*.safetensors", "tokenizer.model"]
    assert includes(hf[1]) == expected_includes(PAPER)
    assert hf[1][-2:] == ["--local-dir", "$HOME/weights/gemma-scope-9b-pt-res"]
    assert scripts[2][0] == ["export", "HF_TOKEN_PATH=$HOME/.lgeo/hf_token"]
    assert ["rm", "-f", "$HOME/.lgeo/hf_token"] in scripts[2]
    # The run: one command for every worker, the launcher's paths then the user's overrides.
    assert lines[7] == (
        "gcloud compute tpus tpu-vm ssh lgeo-test --zone us-west4-a --worker=all --command "
        """'cd "$HOME"/lgeo_jax && "$HOME"/lgeo-venv/bin/lgeo run "$HOME"/.lgeo/configs/paper.yaml --out runs/paper """
        """--set model.checkpoint="$HOME"/weights/gemma-2-9b """
        """--set analysis.gemma_scope_dir="$HOME"/weights/gemma-scope-9b-pt-res --set sae.l1=0.1'"""
    )


def test_tpu_multi_host(tmp_path):
    lines, err = dry_run(TPU, "all", "--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                         "--project", "my-proj", "--spot", "--config", "configs/paper.yaml",
                         "--set", "extract.store=gs://my-bucket/corpus", "--set", "extract.layers=[5,22]",
                         "--out", "/mnt/runs/paper", tmp=tmp_path)
    argvs = [shlex.split(line) for line in lines]
    loc = ["--zone", "us-central2-b", "--project", "my-proj"]
    assert argvs[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *loc, "--accelerator-type", "v4-32",
                        "--version", "tpu-ubuntu2204-base", "--spot"]
    gcloud = [a for a in argvs if a[0] == "gcloud"]
    assert len(gcloud) == 8 and all(shlex.join(loc) in shlex.join(a) for a in gcloud)  # --project everywhere
    assert "warning" not in err  # the corpus is on a bucket
    assert not any("hf_token" in line for line in lines)  # no --hf-token-env: no token copied
    ssh = [a for a in gcloud if a[4] == "ssh"]
    assert all("--worker=all" in a for a in ssh)  # every step on every worker of the slice
    hf = find(simple_commands(ssh[2][-1]), "$HOME/lgeo-venv/bin/hf", "download")
    assert includes(hf[1]) == expected_includes(PAPER, [5, 22])
    run = simple_commands(ssh[3][-1])
    assert run == [["cd", "$HOME/lgeo_jax"],
                   ["$HOME/lgeo-venv/bin/lgeo", "run", "$HOME/.lgeo/configs/paper.yaml", "--out", "/mnt/runs/paper",
                    "--set", "model.checkpoint=$HOME/weights/gemma-2-9b",
                    "--set", "analysis.gemma_scope_dir=$HOME/weights/gemma-scope-9b-pt-res",
                    "--set", "extract.store=gs://my-bucket/corpus", "--set", "extract.layers=[5,22]"]]
    # No coordinator flags on a pod slice: JAX finds the other hosts itself.
    assert argvs[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "pod:/mnt/runs/paper/report", "runs/pod",
                         *loc, "--worker=0", "--recurse"]


def test_tpu_multi_host_local_store_warns_and_detach(tmp_path):
    lines, err = dry_run(TPU, "run", "--name", "pod", "--zone", "z", "--accelerator-type", "v4-32", "--detach",
                         "--config", "configs/paper.yaml", tmp=tmp_path)
    assert "v4-32 has 4 hosts" in err and "extract.store=gs://" in err
    script = shlex.split(lines[1])[-1]
    assert script.startswith('mkdir -p "$HOME"/.lgeo/logs && ( trap "" HUP; cd "$HOME"/lgeo_jax && ')
    assert script.endswith(') > "$HOME"/.lgeo/logs/paper.log 2>&1 < /dev/null & '
                           'echo lgeo run started in the background, log: "$HOME"/.lgeo/logs/paper.log')


def test_tpu_create_delete_status(tmp_path):
    lines, _ = dry_run(TPU, "create", "--name", "x", "--zone", "z", "--accelerator-type", "v6e-8",
                       "--create-arg=--service-account=sa@p.iam.gserviceaccount.com", tmp=tmp_path)
    assert lines == ["gcloud compute tpus tpu-vm create x --zone z --accelerator-type v6e-8 --version v2-alpha-tpuv6e "
                     "--service-account=sa@p.iam.gserviceaccount.com"]
    lines, _ = dry_run(TPU, "delete", "--name", "x", "--zone", "z", "--yes", tmp=tmp_path)
    assert lines == ["gcloud compute tpus tpu-vm delete x --zone z --quiet"]
    lines, _ = dry_run(TPU, "status", "--name", "x", "--zone", "z", "--config", "configs/paper.yaml", tmp=tmp_path)
    argv = shlex.split(lines[0])
    assert argv[8] == "--worker=0"
    assert simple_commands(argv[-1])[1][:5] == ["$HOME/lgeo-venv/bin/lgeo", "status",
                                                "$HOME/.lgeo/configs/paper.yaml", "--out", "runs/paper"]


def test_gpu_all_one_process_per_gpu(tmp_path):
    lines, _ = dry_run(GPU, "all", "--host", "me@gpu-box", "--ssh-option", "Port=2222", "--config",
                       "configs/paper.yaml", "--num-processes", "2", "--hf-token-env", TOKEN_ENV,
                       "--repo-url", "https://example.org/lgeo_jax.git", "--ref", "v1", tmp=tmp_path)
    argvs = [shlex.split(line) for line in lines]
    remote = [a for a in argvs if a[0] in ("ssh", "scp")]
    assert all(a[1:3] == ["-o", "Port=2222"] for a in remote)
    assert [a[0] for a in argvs] == ["ssh", "ssh", "scp", "ssh", "scp", "ssh", "mkdir", "scp"]
    prepare = simple_commands(argvs[0][-1])  # --repo-url: a git checkout, no copy of this one
    assert ["git", "clone", "--quiet", "https://example.org/lgeo_jax.git", "$HOME/lgeo_jax"] in prepare
    assert ["git", "-C", "$HOME/lgeo_jax", "fetch", "--quiet", "origin", "v1"] in prepare
    assert ["$HOME/lgeo-venv/bin/pip", "install", "-U", "jax[cuda12]", "-e", "$HOME/lgeo_jax"] in \
        simple_commands(argvs[1][-1])
    assert argvs[2] == ["scp", "-o", "Port=2222", str(tmp_path / "lgeo-hf-token-gpu-box"), "me@gpu-box:.lgeo/hf_token"]
    hf = find(simple_commands(argvs[3][-1]), "$HOME/lgeo-venv/bin/hf", "download")
    assert includes(hf[1]) == expected_includes(PAPER)
    assert argvs[4] == ["scp", "-o", "Port=2222", "configs/paper.yaml", "me@gpu-box:.lgeo/configs/paper.yaml"]
    runs = find(simple_commands(argvs[5][-1]), "CUDA_VISIBLE_DEVICES=1") + \
        find(simple_commands(argvs[5][-1]), "CUDA_VISIBLE_DEVICES=0")
    tail = ["--set", "model.checkpoint=$HOME/weights/gemma-2-9b",
            "--set", "analysis.gemma_scope_dir=$HOME/weights/gemma-scope-9b-pt-res"]
    for i, words in zip((1, 0), runs, strict=True):
        head = [f"CUDA_VISIBLE_DEVICES={i}", "$HOME/lgeo-venv/bin/lgeo", "run", "$HOME/.lgeo/configs/paper.yaml",
                "--out", "runs/paper", "--coordinator", "localhost:8476", "--num-processes", "2",
                "--process-id", str(i), *tail]
        assert words[: len(head)] == head
    assert argvs[6:] == [["mkdir", "-p", "runs/gpu-box"],
                         ["scp", "-o", "Port=2222", "-r", "me@gpu-box:lgeo_jax/runs/paper/report", "runs/gpu-box"]]


def test_gpu_single_process_gemma2_2b(tmp_path):
    lines, err = dry_run(GPU, "setup", "--host", "gpu-box", "--config", "configs/gemma2_2b.yaml", tmp=tmp_path)
    assert shlex.split(lines[1]) == ["scp", "-r", *SOURCES, "gpu-box:lgeo_jax"]
    hf = find(simple_commands(shlex.split(lines[-1])[-1]), "$HOME/lgeo-venv/bin/hf", "download")
    assert [c[2] for c in hf] == ["google/gemma-2-2b"]  # analysis.gemma_scope_dir: null -> no Gemma Scope
    lines, _ = dry_run(GPU, "run", "--host", "gpu-box", "--config", "configs/gemma2_2b.yaml", tmp=tmp_path)
    assert lines[1] == ("ssh gpu-box 'cd \"$HOME\"/lgeo_jax && \"$HOME\"/lgeo-venv/bin/lgeo run "
                        "\"$HOME\"/.lgeo/configs/gemma2_2b.yaml --out runs/gemma2_2b "
                        "--set model.checkpoint=\"$HOME\"/weights/gemma-2-2b'")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (TPU, ["create", "--name", "x", "--zone", "z"], "the following arguments are required: --accelerator-type"),
        (TPU, ["run", "--name", "x", "--config", "configs/paper.yaml"], "the following arguments are required: --zone"),
        (GPU, ["run", "--config", "configs/paper.yaml"], "the following arguments are required: --host"),
        (GPU, ["setup", "--host", "h"], "the following arguments are required: --config"),
    ],
)
def test_missing_required_option(tmp_path, script, args, message):
    proc = launch(script, *args, "--dry-run", tmp=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and "usage:" in proc.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (TPU, ["setup", "--name", "x", "--zone", "z", "--config", "configs/paper.yaml",
               "--set", "analysis.gemma_scope_l0={5: 77}"], "no Gemma Scope L0 for layer(s) [10, 18, 22, 32, 38]"),
        (GPU, ["run", "--host", "h", "--config", "configs/paper.yaml", "--out", "gs://b/run"],
         "--set extract.store=gs://"),
        (TPU, ["create", "--name", "x", "--zone", "z", "--accelerator-type", "tpu9-8"], "pass --runtime-version"),
        (GPU, ["run", "--host", "h", "--config", "configs/missing.yaml"], "cannot read the config"),
    ],
)
def test_clear_errors(tmp_path, script, args, message):
    proc = launch(script, *args, "--dry-run", tmp=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and proc.stderr.count("\n") == 1  # one line, no traceback


def test_real_run_refuses_unset_token_before_any_command(tmp_path):
    proc = launch(GPU, "setup", "--host", "h", "--config", "configs/paper.yaml", "--hf-token-env", TOKEN_ENV,
                  tmp=tmp_path, token=False)
    assert proc.returncode == 2 and "environment variable LGEO_TEST_HF_TOKEN is not set" in proc.stderr
    assert "+ " not in proc.stderr  # nothing was run


# --- the remote scripts, run under sh against stubs ---------------------------------------------------------


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_remote(script: str, home: Path, **env: str) -> int:
    return subprocess.run(["sh", "-c", script], env={"HOME": str(home), "PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30).returncode


def test_gpu_process_script_runs_every_process_and_reports_failure(tmp_path):
    lines, _ = dry_run(GPU, "run", "--host", "h", "--config", "configs/paper.yaml", "--num-processes", "3",
                       tmp=tmp_path)
    script = shlex.split(lines[1])[-1]
    home = tmp_path / "home"
    (home / "lgeo_jax").mkdir(parents=True)
    # the stub records its GPU and process id, and exits with FAIL_<id> (default 0)
    stub(home / "lgeo-venv" / "bin" / "lgeo", 'while [ "$1" != --process-id ]; do shift; done\n'
         'echo "$CUDA_VISIBLE_DEVICES $2" > "$HOME/proc-$2"\neval "exit \\${FAIL_$2:-0}"\n')
    assert run_remote(script, home) == 0
    assert sorted((home / f"proc-{i}").read_text() for i in range(3)) == ["0 0\n", "1 1\n", "2 2\n"]
    assert run_remote(script, home, FAIL_2="3") == 1  # a background process failed
    assert run_remote(script, home, FAIL_0="4") == 4  # process 0's own status


def test_download_script_removes_the_token_even_on_failure(tmp_path):
    lines, _ = dry_run(TPU, "setup", "--name", "x", "--zone", "z", "--config", "configs/paper.yaml",
                       "--hf-token-env", TOKEN_ENV, tmp=tmp_path)
    script = shlex.split(lines[-1])[-1]
    home = tmp_path / "home"
    stub(home / "lgeo-venv" / "bin" / "hf", 'echo "$HF_TOKEN_PATH $2" >> "$HOME/calls"\nexit "${HF_EXIT:-0}"\n')
    for hf_exit, calls in (("0", 2), ("7", 1)):
        (home / ".lgeo").mkdir(exist_ok=True)
        (home / ".lgeo" / "hf_token").write_text("t")
        (home / "calls").unlink(missing_ok=True)
        assert run_remote(script, home, HF_EXIT=hf_exit) == int(hf_exit)
        assert not (home / ".lgeo" / "hf_token").exists()
        assert (home / "calls").read_text().splitlines()[:1] == [f"{home}/.lgeo/hf_token google/gemma-2-9b"]
        assert len((home / "calls").read_text().splitlines()) == calls
