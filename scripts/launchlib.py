"""Shared parts of the launchers `scripts/tpu/launch.py` and `scripts/gpu/launch.py` (docs/launch.md).

A launcher runs on the user's laptop, where `lgeo_jax` may not be installed, so nothing here imports it: the
study config is read straight from its YAML with PyYAML, with `--set dotted.key=value` overrides applied the
way `lgeo` applies them (each value parsed as YAML). What comes from the config:

- `extract.layers`, `analysis.gemma_scope_l0`, `analysis.gemma_scope_width` and `analysis.dictionary_dirs`:
  the Gemma Scope `--include` patterns (`layer_5/width_16k/average_l0_77/*`), one per layer that needs one;
- `model.checkpoint` / `model.n_layers`: whether to download a checkpoint, and which (placeholder -> download);
- `analysis.gemma_scope_dir`: whether to download Gemma Scope (placeholder -> download, null -> no);
- `run_dir`: the run directory on the remote machine when `--out` is not given;
- `extract.store`: a multi-host TPU slice needs a shared (`gs://`) corpus store.

Every step is a `Command` (an argv list). `--dry-run` prints each as `shlex.join(argv)`, one per line, and
runs nothing; otherwise each is echoed on stderr and run, and the first failure stops the launcher with its
exit status. Remote steps are shell scripts (one string) built from `Sh` fragments, so that `~/...` paths
become `"$HOME"/...` on the remote side and everything else is quoted with `shlex.quote`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
"""The checkout the launchers live in; `setup` copies its package sources unless --repo-url is given."""
REPO_SOURCES = ("lgeo_jax", "pyproject.toml", "README.md", "configs")
"""What `pip install -e .` and `lgeo run` need from the checkout (not runs/, .git, caches or benchmarks)."""

PLACEHOLDER_PREFIX = "FILL_IN"  # as lgeo_jax.config: the shipped paper configs' unfilled paths
# Defaults of the fields we read, mirroring lgeo_jax.config (a key missing from the YAML means the default).
DEFAULT_LAYERS = (5, 10, 18, 22, 32, 38)
DEFAULT_GEMMA_SCOPE_WIDTH = "width_16k"
DEFAULT_GEMMA_SCOPE_L0 = {5: 77, 10: 113, 18: 71, 22: 123, 32: 111, 38: 128}  # canonical 9B folders
DEFAULT_RUN_DIR = "runs/study"

MODEL_REPOS = {42: "google/gemma-2-9b", 26: "google/gemma-2-2b", 46: "google/gemma-2-27b"}
"""Hub checkpoint by `model.n_layers`, when the config's checkpoint is still a placeholder."""
GEMMA_SCOPE_REPOS = {
    "google/gemma-2-9b": "google/gemma-scope-9b-pt-res",
    "google/gemma-2-2b": "google/gemma-scope-2b-pt-res",
    "google/gemma-2-27b": "google/gemma-scope-27b-pt-res",
}
CHECKPOINT_INCLUDES = ("*.json", "*.safetensors", "tokenizer.model")
"""What a Hugging Face checkpoint directory needs (config, weights + index, tokenizer); skips e.g. GGUF copies."""

UV_INSTALLER = "https://astral.sh/uv/install.sh"
STATE_DIR = "~/.lgeo"  # on the remote: configs/ (copied configs), logs/, hf_token (only during downloads)


class LaunchError(Exception):
    """A problem the user fixes by changing an option or the config; printed as one line, exit status 2."""


# --- shell fragments -------------------------------------------------------------------------------------


class Sh(str):
    """A shell fragment that goes into a remote script as it is (everything else is `shlex.quote`d)."""


_DOUBLE_QUOTE_SPECIAL = re.compile(r"[\s$`\\\"!']")


def quote(word: str) -> str:
    """Fragments as they are; plain words with `shlex.quote`, except that a word whose only unsafe characters
    are glob or bracket characters (`layer_5/.../*`, `jax[tpu]`) gets double quotes, which read better once
    the whole script is single-quoted again for the local command line."""
    if isinstance(word, Sh):
        return word
    quoted = shlex.quote(word)
    if quoted != word and word and not _DOUBLE_QUOTE_SPECIAL.search(word):
        return f'"{word}"'
    return quoted


def sh(*words: str) -> Sh:
    """One simple command: the words quoted (fragments kept) and joined by spaces."""
    return Sh(" ".join(quote(w) for w in words))


def chain(*commands: str) -> Sh:
    """`a && b && c`."""
    return Sh(" && ".join(commands))


def rpath(path: str) -> Sh:
    """A remote path as a shell word: a leading `~` becomes `"$HOME"` (so it expands), the rest is quoted."""
    if path == "~":
        return Sh('"$HOME"')
    if path.startswith("~/"):
        return Sh('"$HOME"/' + shlex.quote(path[2:]))
    return Sh(shlex.quote(path))


def rjoin(base: str, *parts: str) -> str:
    """Join remote path components (POSIX), keeping a leading `~`."""
    return posixpath.join(base, *parts)


def scp_path(path: str) -> str:
    """A remote path for scp, where relative means relative to the home directory (`~/x` -> `x`)."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def remote_under(base: str, path: str) -> str:
    """`path` on the remote: as it is when absolute or `~/...`, else relative to the directory `base`."""
    return path if path.startswith(("/", "~")) else rjoin(base, path)


def setting(key: str, path: str) -> Sh:
    """`key=<remote path>` as one shell word, for `--set`."""
    return Sh(shlex.quote(f"{key}=") + rpath(path))


# --- commands --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Secret:
    """A local file holding the value of environment variable `env`, written (mode 0600) just before its
    command runs and removed right after; `--dry-run` prints its path and writes nothing."""

    path: str
    env: str


@dataclasses.dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    secret: Secret | None = None

    def line(self) -> str:
        return shlex.join(self.argv)


def command(*argv: str, secret: Secret | None = None) -> Command:
    return Command(tuple(str(a) for a in argv), secret)


def token_file(label: str, env: str) -> Secret:
    """Where the HF token is staged locally before it is copied to the remote: fixed for a given target (so
    `--dry-run` shows the exact path), in the user's temp directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    return Secret(os.path.join(tempfile.gettempdir(), f"lgeo-hf-token-{safe}"), env)


def _write_secret(secret: Secret) -> None:
    value = os.environ.get(secret.env, "")
    if not value:
        raise LaunchError(f"--hf-token-env {secret.env}: environment variable {secret.env} is not set or empty")
    if os.path.lexists(secret.path):
        os.unlink(secret.path)
    fd = os.open(secret.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value.strip())


def execute(commands: Sequence[Command], *, dry_run: bool) -> int:
    """Print the commands (dry run) or run them in order, stopping at the first failure (its exit status)."""
    unset = sorted({c.secret.env for c in commands if c.secret is not None and not os.environ.get(c.secret.env)})
    if dry_run:
        for env in unset:
            warn(f"environment variable {env} (--hf-token-env) is not set; a real run would stop here")
        for cmd in commands:
            print(cmd.line(), flush=True)
        return 0
    if unset:  # before the first command, not halfway through a setup
        raise LaunchError(f"--hf-token-env {unset[0]}: environment variable {unset[0]} is not set or empty")
    for cmd in commands:
        print(f"+ {cmd.line()}", file=sys.stderr, flush=True)
        try:
            if cmd.secret is not None:
                _write_secret(cmd.secret)
            rc = subprocess.run(cmd.argv, check=False).returncode
        except FileNotFoundError:
            raise LaunchError(f"{cmd.argv[0]!r} not found: install it or put it on PATH") from None
        finally:
            if cmd.secret is not None and os.path.lexists(cmd.secret.path):
                os.unlink(cmd.secret.path)
        if rc != 0:
            print(f"launch: command failed with exit status {rc}: {cmd.line()}", file=sys.stderr)
            return rc
    return 0


def warn(message: str) -> None:
    print(f"launch: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr)


# --- the study config ------------------------------------------------------------------------------------


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """A copy of `raw` with each `a.b.c=value` applied (value parsed as YAML), as `lgeo --set` does."""
    out = yaml.safe_load(yaml.safe_dump(dict(raw)))  # deep copy of plain YAML data
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise LaunchError(f"--set {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise LaunchError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise LaunchError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return out


def is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX)


def _int_keys(mapping: Any, key: str) -> dict[int, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise LaunchError(f"{key} must be a mapping of layer -> value, got {mapping!r}")
    try:
        return {int(k): v for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise LaunchError(f"{key} keys must be layer numbers, got {list(mapping)}") from None


@dataclasses.dataclass(frozen=True)
class Study:
    """The few config values the launchers need, read from the YAML plus overrides."""

    path: Path
    layers: tuple[int, ...]
    gemma_scope_width: str
    gemma_scope_l0: dict[int, int]
    dictionary_layers: frozenset[int]
    checkpoint: str | None
    n_layers: int | None
    gemma_scope_dir: str | None
    run_dir: str
    store: str | None

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> Study:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise LaunchError(f"cannot read the config {str(path)!r} ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise LaunchError(f"{path}: malformed YAML ({getattr(e, 'problem', e)})") from None
        raw = raw if raw is not None else {}
        if not isinstance(raw, Mapping):
            raise LaunchError(f"{path}: expected a mapping at the top level")
        raw = apply_overrides(raw, overrides)
        model, extract, analysis = (raw.get(s) or {} for s in ("model", "extract", "analysis"))
        for section, value in (("model", model), ("extract", extract), ("analysis", analysis)):
            if not isinstance(value, Mapping):
                raise LaunchError(f"{path}: {section} must be a mapping, got {value!r}")
        layers = extract.get("layers", DEFAULT_LAYERS)
        if not isinstance(layers, list | tuple) or not all(isinstance(x, int) for x in layers):
            raise LaunchError(f"extract.layers must be a list of layer numbers, got {layers!r}")
        l0 = analysis.get("gemma_scope_l0", DEFAULT_GEMMA_SCOPE_L0)
        return cls(
            path=path,
            layers=tuple(layers),
            gemma_scope_width=str(analysis.get("gemma_scope_width", DEFAULT_GEMMA_SCOPE_WIDTH)),
            gemma_scope_l0=_int_keys(l0, "analysis.gemma_scope_l0"),
            dictionary_layers=frozenset(_int_keys(analysis.get("dictionary_dirs"), "analysis.dictionary_dirs")),
            checkpoint=model.get("checkpoint"),
            n_layers=model.get("n_layers"),
            gemma_scope_dir=analysis.get("gemma_scope_dir"),
            run_dir=str(raw.get("run_dir", DEFAULT_RUN_DIR)),
            store=extract.get("store"),
        )

    @property
    def gemma_scope_layers(self) -> tuple[int, ...]:
        """Layers whose reference dictionary is Gemma Scope (not one of `analysis.dictionary_dirs`)."""
        return tuple(layer for layer in self.layers if layer not in self.dictionary_layers)


def gemma_scope_includes(study: Study) -> list[str]:
    """`--include` patterns for the Gemma Scope folders the analysis reads: `layer_L/<width>/average_l0_N/*`."""
    missing = [layer for layer in study.gemma_scope_layers if layer not in study.gemma_scope_l0]
    if missing:
        raise LaunchError(
            f"no Gemma Scope L0 for layer(s) {missing} of extract.layers in {study.path}: add `<layer>: <L0>` "
            f"entries to analysis.gemma_scope_l0 (e.g. --set 'analysis.gemma_scope_l0={{{missing[0]}: 77}}')"
        )
    return [f"layer_{layer}/{study.gemma_scope_width}/average_l0_{study.gemma_scope_l0[layer]}/*"
            for layer in study.gemma_scope_layers]


# --- what to download and how to run ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things live on the remote machine (`~/...` is the remote home directory)."""

    repo: str = "~/lgeo_jax"
    venv: str = "~/lgeo-venv"
    weights: str = "~/weights"
    state: str = STATE_DIR

    @property
    def configs(self) -> str:
        return rjoin(self.state, "configs")

    @property
    def logs(self) -> str:
        return rjoin(self.state, "logs")

    @property
    def token(self) -> str:
        return rjoin(self.state, "hf_token")

    def bin(self, name: str) -> Sh:
        return rpath(rjoin(self.venv, "bin", name))

    def config(self, study: Study) -> str:
        return rjoin(self.configs, study.path.name)


@dataclasses.dataclass(frozen=True)
class Download:
    repo: str
    local_dir: str
    includes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `setup` downloads, and the `--set` overrides `run` adds so the config points at those copies."""

    downloads: tuple[Download, ...]
    settings: tuple[Sh, ...]


def plan_downloads(study: Study, args: argparse.Namespace, layout: Layout) -> Plan:
    downloads, settings = [], []
    model_repo = args.model_repo or MODEL_REPOS.get(study.n_layers)
    if study.checkpoint is None or is_placeholder(study.checkpoint):
        if model_repo is None:
            raise LaunchError(
                f"model.checkpoint in {study.path} is a placeholder and model.n_layers={study.n_layers} is not "
                f"a known Gemma-2 size: pass --model-repo (e.g. google/gemma-2-9b) or --set model.checkpoint=DIR"
            )
        local = rjoin(layout.weights, model_repo.rsplit("/", 1)[-1])
        downloads.append(Download(model_repo, local, CHECKPOINT_INCLUDES))
        settings.append(setting("model.checkpoint", local))
    wants_scope = is_placeholder(study.gemma_scope_dir) or (study.gemma_scope_dir is None and args.gemma_scope_repo)
    if wants_scope and study.gemma_scope_layers:
        scope_repo = args.gemma_scope_repo or GEMMA_SCOPE_REPOS.get(model_repo or "")
        if scope_repo is None:
            raise LaunchError("cannot tell which Gemma Scope release matches the checkpoint: pass --gemma-scope-repo "
                              "(e.g. google/gemma-scope-9b-pt-res) or --set analysis.gemma_scope_dir=DIR")
        local = rjoin(layout.weights, scope_repo.rsplit("/", 1)[-1])
        downloads.append(Download(scope_repo, local, tuple(gemma_scope_includes(study))))
        settings.append(setting("analysis.gemma_scope_dir", local))
    return Plan(tuple(downloads), tuple(settings))


def download_script(plan: Plan, layout: Layout, *, with_token: bool) -> Sh | None:
    """`hf download` of each planned repo (huggingface_hub >= 1.0: one `--include` per pattern); with a
    token, `HF_TOKEN_PATH` points at the uploaded token file, which is removed afterwards whatever happens."""
    if not plan.downloads:
        return None
    steps = []
    for d in plan.downloads:
        words: list[str] = [layout.bin("hf"), "download", d.repo]
        for pattern in d.includes:
            words += ["--include", pattern]
        steps.append(sh(*words, "--local-dir", rpath(d.local_dir)))
    if not with_token:
        return chain(*steps)
    token = rpath(layout.token)
    return Sh(f"{chain(Sh('export HF_TOKEN_PATH=' + token), *steps)}; rc=$?; rm -f {token}; exit $rc")


def prepare_script(layout: Layout, args: argparse.Namespace) -> Sh:
    """Remote directories, plus the git checkout when --repo-url is given (else the sources are copied)."""
    dirs = [layout.configs, layout.logs, layout.weights]
    if not args.repo_url:
        return sh("mkdir", "-p", *(rpath(p) for p in (layout.repo, *dirs)))
    repo = rpath(layout.repo)
    return chain(
        sh("mkdir", "-p", *(rpath(p) for p in dirs)),
        Sh(f"{{ test -d {repo}/.git || git clone --quiet {shlex.quote(args.repo_url)} {repo}; }}"),
        sh("git", "-C", repo, "fetch", "--quiet", "origin", args.ref),
        sh("git", "-C", repo, "checkout", "--quiet", "--detach", "FETCH_HEAD"),
    )


def install_script(layout: Layout, args: argparse.Namespace, jax_extra: str) -> Sh:
    """uv (for a Python >= 3.11 the image may lack), a venv, then `jax[<extra>]` and the package in one pip
    resolve (so pip picks a jax release that both accept)."""
    return chain(
        Sh('export PATH="$HOME/.local/bin:$PATH"'),
        Sh(f"{{ command -v uv >/dev/null 2>&1 || curl -LsSf {UV_INSTALLER} | env UV_NO_MODIFY_PATH=1 sh; }}"),
        sh("uv", "venv", "--allow-existing", "--seed", "--python", args.python, rpath(layout.venv)),
        sh(layout.bin("pip"), "install", "-U", f"jax[{jax_extra}]", "-e", rpath(layout.repo)),
        Sh(f"{layout.bin('lgeo')} --help >/dev/null"),
    )


def lgeo_words(subcommand: str, study: Study, args: argparse.Namespace, layout: Layout, plan: Plan,
               flags: Sequence[str] = ()) -> list[str]:
    """`<venv>/bin/lgeo SUBCOMMAND <copied config> --out OUT [flags] --set <launcher's>... --set <user's>...`."""
    words: list[str] = [layout.bin("lgeo"), subcommand, rpath(layout.config(study)), "--out",
                        rpath(out_dir(study, args)), *flags]
    for s in (*plan.settings, *args.set):
        words += ["--set", s]
    return words


def in_repo(layout: Layout, *commands: str) -> Sh:
    return chain(sh("cd", rpath(layout.repo)), *commands)


def detached(script: str, layout: Layout, study: Study) -> Sh:
    """`script` in a background subshell that ignores SIGHUP (what nohup does), output in
    `<state>/logs/<config stem>.log`, so the ssh session can end while the run goes on."""
    log = rpath(rjoin(layout.logs, f"{study.path.stem}.log"))
    return Sh(f'mkdir -p {rpath(layout.logs)} && ( trap "" HUP; {script} ) > {log} 2>&1 < /dev/null & '
              f"echo lgeo run started in the background, log: {log}")


def out_dir(study: Study, args: argparse.Namespace) -> str:
    """The run directory on the remote: --out, else the config's run_dir (relative: to the remote checkout)."""
    out = args.out or study.run_dir
    if "://" in out:
        raise LaunchError(f"--out {out!r}: the run directory must be a path on the remote machine; put the "
                          f"corpus on a bucket with --set extract.store=gs://bucket/path instead")
    return out


def report_dir(study: Study, args: argparse.Namespace, layout: Layout) -> str:
    """`<run dir>/report` as an scp source path on the remote."""
    return scp_path(rjoin(remote_under(layout.repo, out_dir(study, args)), "report"))


def layout_from(args: argparse.Namespace) -> Layout:
    return Layout(repo=args.remote_dir, venv=args.venv, weights=args.weights_dir)


def repo_sources() -> list[str]:
    return [str(REPO / name) for name in REPO_SOURCES]


# --- argument parsing ------------------------------------------------------------------------------------


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact commands (one per line, shell-quoted) instead of running them")


def add_study_args(p: argparse.ArgumentParser) -> None:
    """--config/--set/--out and where things live on the remote (setup, run, status, fetch, all)."""
    g = p.add_argument_group("study")
    g.add_argument("--config", required=True, help="study config (YAML), e.g. configs/paper.yaml; copied to the remote")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed through to lgeo (repeatable), e.g. --set extract.store=gs://b/corpus")
    g.add_argument("--out", help="run directory on the remote (default: the config's run_dir; relative paths are "
                                 "inside --remote-dir); the corpus can go to a bucket with --set extract.store=gs://...")
    g.add_argument("--remote-dir", default="~/lgeo_jax", help="the checkout on the remote (default: %(default)s)")
    g.add_argument("--venv", default="~/lgeo-venv", help="virtual environment on the remote (default: %(default)s)")
    g.add_argument("--weights-dir", default="~/weights",
                   help="where checkpoints and Gemma Scope are downloaded on the remote (default: %(default)s)")
    g.add_argument("--model-repo", help="Hub checkpoint to download when model.checkpoint is a placeholder "
                                        "(default: from model.n_layers, e.g. 42 -> google/gemma-2-9b)")
    g.add_argument("--gemma-scope-repo", help="Gemma Scope release to download (default: the checkpoint's, e.g. "
                                              "google/gemma-scope-9b-pt-res, when analysis.gemma_scope_dir is a "
                                              "placeholder)")


def add_install_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("setup")
    g.add_argument("--repo-url", help="git clone this URL on the remote instead of copying this checkout")
    g.add_argument("--ref", default="HEAD", help="branch, tag or commit of --repo-url (default: its default branch)")
    g.add_argument("--python", default="3.12", help="Python version for the remote venv, via uv (default: %(default)s)")
    g.add_argument("--hf-token-env", metavar="VAR",
                   help="name of the local environment variable holding a Hugging Face token (gated google/gemma-2-*); "
                        "copied to the remote for the downloads only")


def add_run_args(p: argparse.ArgumentParser, *, detach: bool) -> None:
    if detach:
        p.add_argument("--detach", action="store_true",
                       help="start lgeo run in the background, immune to SIGHUP, and return "
                            f"(log in {STATE_DIR}/logs/<config>.log)")


def add_fetch_args(p: argparse.ArgumentParser, default_hint: str) -> None:
    p.add_argument("--fetch-to", help=f"local directory that receives report/ (default: {default_hint})")


def run_main(parser: argparse.ArgumentParser, build, argv: Sequence[str] | None = None) -> int:
    """Parse, build the command list with `build(args)`, and print or run it; LaunchError -> one line, exit 2."""
    args = parser.parse_args(argv)
    try:
        return execute(build(args), dry_run=args.dry_run)
    except LaunchError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (rerun the same subcommand: setup and lgeo run resume)", file=sys.stderr)
        return 130
