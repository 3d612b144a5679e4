#!/usr/bin/env python3
"""Run the whole lgeo study on one multi-GPU host reached over ssh (e.g. 8 x H100).

    python scripts/gpu/launch.py all --host me@gpu-box --config configs/paper.yaml \\
        --hf-token-env HF_TOKEN [--num-processes 8] [--dry-run]

Subcommands: setup (uv + venv, `jax[cuda12]` and the package, checkpoint and Gemma Scope downloads), run
(`lgeo run`: by default one process drives all local GPUs; `--num-processes N` starts one process per GPU,
each with its own CUDA_VISIBLE_DEVICES and the coordinator flags on localhost), status (`lgeo status`),
fetch (report/ back with scp), all (setup + run + fetch). `--dry-run` prints the ssh/scp commands instead
of running them. The remote login shell must be a POSIX one (bash, zsh, dash). See docs/launch.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import launchlib as ll  # scripts/launchlib.py, beside this folder (found through the sys.path entry above)


class Host:
    """ssh/scp commands for one machine."""

    def __init__(self, args: argparse.Namespace):
        self.host = args.host
        self.options = [w for opt in args.ssh_option for w in ("-o", opt)]

    def ssh(self, script: str) -> ll.Command:
        return ll.command("ssh", *self.options, self.host, script)

    def scp(self, *paths: str, recurse: bool = False, secret: ll.Secret | None = None) -> ll.Command:
        return ll.command("scp", *self.options, *(["-r"] if recurse else []), *paths, secret=secret)

    def remote(self, path: str) -> str:
        return f"{self.host}:{ll.scp_path(path)}"

    @property
    def label(self) -> str:
        """`me@gpu-box` -> `gpu-box` (for local file and directory names)."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.host.rsplit("@", 1)[-1])


def setup(args: argparse.Namespace) -> list[ll.Command]:
    host, layout = Host(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    cmds = [host.ssh(ll.prepare_script(layout, args))]
    if not args.repo_url:
        cmds.append(host.scp(*ll.repo_sources(), host.remote(layout.repo), recurse=True))
    cmds.append(host.ssh(ll.install_script(layout, args, "cuda12")))
    script = ll.download_script(plan, layout, with_token=bool(args.hf_token_env))
    if script is None:
        ll.note(f"{study.path}: nothing to download (checkpoint and Gemma Scope are given or not used)")
        return cmds
    if args.hf_token_env:
        secret = ll.token_file(host.label, args.hf_token_env)
        cmds.append(host.scp(secret.path, host.remote(layout.token), secret=secret))
    cmds.append(host.ssh(script))
    return cmds


def process_script(study: ll.Study, args: argparse.Namespace, layout: ll.Layout, plan: ll.Plan) -> ll.Sh:
    """One `lgeo run` per GPU: processes 1..N-1 in the background (output in <state>/logs), process 0 in the
    foreground; a failed process 0 stops the others; the exit status is 0 only if every process succeeded."""
    n, coordinator = args.num_processes, f"localhost:{args.coordinator_port}"

    def words(i: int) -> ll.Sh:
        flags = ["--coordinator", coordinator, "--num-processes", str(n), "--process-id", str(i)]
        return ll.sh(f"CUDA_VISIBLE_DEVICES={i}", *ll.lgeo_words("run", study, args, layout, plan, flags))

    logs = [ll.rpath(ll.rjoin(layout.logs, f"{study.path.stem}-process-{i}.log")) for i in range(n)]
    pids = " ".join(f"$p{i}" for i in range(1, n))
    parts = [f"{ll.in_repo(layout, ll.sh('mkdir', '-p', ll.rpath(layout.logs)))} || exit 1"]
    parts += [f"{words(i)} > {logs[i]} 2>&1 & p{i}=$!" for i in range(1, n)]
    parts += [words(0), "rc=$?", f"[ $rc -eq 0 ] || kill {pids} 2>/dev/null"]
    parts += [f"wait $p{i} || [ $rc -ne 0 ] || rc=1" for i in range(1, n)]  # keep the first failure's status
    return ll.Sh("; ".join([*parts, "exit $rc"]))


def run(args: argparse.Namespace) -> list[ll.Command]:
    host, layout = Host(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    if args.num_processes < 1:
        raise ll.LaunchError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.num_processes == 1:
        script = ll.in_repo(layout, ll.sh(*ll.lgeo_words("run", study, args, layout, plan)))
    else:
        script = process_script(study, args, layout, plan)
    if getattr(args, "detach", False):
        script = ll.detached(script, layout, study)
    return [host.scp(str(study.path), host.remote(layout.config(study))), host.ssh(script)]


def status(args: argparse.Namespace) -> list[ll.Command]:
    host, layout = Host(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    return [host.ssh(ll.in_repo(layout, ll.sh(*ll.lgeo_words("status", study, args, layout, plan))))]


def fetch(args: argparse.Namespace) -> list[ll.Command]:
    host, layout = Host(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    dest = args.fetch_to or f"runs/{host.label}"
    return [ll.command("mkdir", "-p", dest),
            host.scp(f"{args.host}:{ll.report_dir(study, args, layout)}", dest, recurse=True)]


def everything(args: argparse.Namespace) -> list[ll.Command]:
    return [*setup(args), *run(args), *fetch(args)]


SUBCOMMANDS = {
    "setup": (setup, "install uv, jax[cuda12] and the package in a venv; download checkpoint and Gemma Scope"),
    "run": (run, "copy the config and run `lgeo run` (one process, or one per GPU with --num-processes)"),
    "status": (status, "`lgeo status`: which stages are complete"),
    "fetch": (fetch, "copy report/ back"),
    "all": (everything, "setup + run + fetch"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu/launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, (build, help_text) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.set_defaults(build=build)
        g = s.add_argument_group("host")
        g.add_argument("--host", required=True, help="ssh destination, e.g. me@gpu-box (or a Host from ~/.ssh/config)")
        g.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE",
                       help="ssh/scp -o option (repeatable), e.g. --ssh-option Port=2222")
        ll.add_study_args(s)
        if name in ("setup", "all"):
            ll.add_install_args(s)
        if name in ("run", "all"):
            g = s.add_argument_group("run")
            g.add_argument("--num-processes", type=int, default=1,
                           help="1 (default): one process drives all local GPUs; N: one process per GPU 0..N-1, "
                                "joined through a coordinator on localhost")
            g.add_argument("--coordinator-port", type=int, default=8476,
                           help="localhost port of the coordinator with --num-processes > 1 (default: %(default)s)")
            ll.add_run_args(s, detach=name == "run")
        if name in ("fetch", "all"):
            ll.add_fetch_args(s, "runs/HOST")
        ll.add_dry_run(s)
    return p


def main(argv: list[str] | None = None) -> int:
    return ll.run_main(parser(), lambda args: args.build(args), argv)


if __name__ == "__main__":
    sys.exit(main())
