#!/usr/bin/env python3
"""Run the whole lgeo study on a Cloud TPU VM (single host: v5litepod-8, v4-8; multi-host: v4-32, ...).

    python scripts/tpu/launch.py all --name lgeo --zone us-central2-b --accelerator-type v4-8 \\
        --config configs/paper.yaml --hf-token-env HF_TOKEN [--dry-run]

Subcommands: create (the VM), setup (uv + venv, `jax[tpu]` and the package, checkpoint and Gemma Scope
downloads on every worker), run (`lgeo run` on all workers at once; on a pod slice JAX finds the other
hosts itself, so every worker runs the same command), status (`lgeo status` on worker 0), fetch (report/
from worker 0), delete (the VM), all (create + setup + run + fetch). `--dry-run` prints the gcloud commands
instead of running them. See docs/launch.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import launchlib as ll  # scripts/launchlib.py, beside this folder (found through the sys.path entry above)

RUNTIMES = (  # accelerator-type prefix -> TPU software version for JAX (cloud.google.com/tpu/docs/runtimes)
    ("v6e-", "v2-alpha-tpuv6e"),
    ("v5p-", "v2-alpha-tpuv5"),
    ("v5litepod-", "v2-alpha-tpuv5-lite"),
    ("v5e-", "v2-alpha-tpuv5-lite"),
    ("v4-", "tpu-ubuntu2204-base"),
    ("v3-", "tpu-ubuntu2204-base"),
    ("v2-", "tpu-ubuntu2204-base"),
)
SHARED_STORES = ("gs://", "s3://")


def default_runtime(accelerator_type: str) -> str:
    for prefix, runtime in RUNTIMES:
        if accelerator_type.startswith(prefix):
            return runtime
    raise ll.LaunchError(f"no default TPU software version for --accelerator-type {accelerator_type!r}: "
                         f"pass --runtime-version")


def host_count(accelerator_type: str) -> int | None:
    """Hosts in a slice: v2-v5p names count TensorCores (8 per host); v5e/v6e count chips (8 on one host, else
    4 per host). None for a name we do not know."""
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
    if m is None:
        return None
    family, n = m.group(1), int(m.group(2))
    if family in ("v5litepod", "v5e", "v6e"):
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


class Tpu:
    """gcloud commands for one TPU VM."""

    def __init__(self, args: argparse.Namespace):
        self.name, self.args = args.name, args
        self.location = ["--zone", args.zone] + (["--project", args.project] if args.project else [])

    def gcloud(self, verb: str, *rest: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest]

    def ssh(self, script: str, *, worker: str = "all") -> ll.Command:
        return ll.command(*self.gcloud("ssh", self.name, *self.location, f"--worker={worker}", "--command", script),
                          *self.args.ssh_arg)

    def scp(self, *paths: str, worker: str = "all", recurse: bool = False, secret: ll.Secret | None = None):
        flags = [f"--worker={worker}", *(["--recurse"] if recurse else []), *self.args.ssh_arg]
        return ll.command(*self.gcloud("scp", *paths, *self.location), *flags, secret=secret)

    def remote(self, path: str) -> str:
        return f"{self.name}:{ll.scp_path(path)}"


def create(args: argparse.Namespace) -> list[ll.Command]:
    tpu = Tpu(args)
    runtime = args.runtime_version or default_runtime(args.accelerator_type)
    spot = ["--spot"] if args.spot else []
    return [ll.command(*tpu.gcloud("create", args.name, *tpu.location), "--accelerator-type", args.accelerator_type,
                       "--version", runtime, *spot, *args.create_arg)]


def setup(args: argparse.Namespace) -> list[ll.Command]:
    tpu, layout = Tpu(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    cmds = [tpu.ssh(ll.prepare_script(layout, args))]
    if not args.repo_url:
        cmds.append(tpu.scp(*ll.repo_sources(), tpu.remote(layout.repo), recurse=True))
    cmds.append(tpu.ssh(ll.install_script(layout, args, "tpu")))
    script = ll.download_script(plan, layout, with_token=bool(args.hf_token_env))
    if script is None:
        ll.note(f"{study.path}: nothing to download (checkpoint and Gemma Scope are given or not used)")
        return cmds
    if args.hf_token_env:
        secret = ll.token_file(args.name, args.hf_token_env)
        cmds.append(tpu.scp(secret.path, tpu.remote(layout.token), secret=secret))
    cmds.append(tpu.ssh(script))
    return cmds


def run(args: argparse.Namespace) -> list[ll.Command]:
    tpu, layout = Tpu(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    hosts = host_count(args.accelerator_type) if args.accelerator_type else None
    if hosts is not None and hosts > 1 and not str(study.store or "").startswith(SHARED_STORES):
        ll.warn(f"{args.accelerator_type} has {hosts} hosts and no shared disk: all of them write the corpus, so "
                f"put it on a bucket with --set extract.store=gs://BUCKET/PATH")
    script = ll.in_repo(layout, ll.sh(*ll.lgeo_words("run", study, args, layout, plan)))
    if getattr(args, "detach", False):
        script = ll.detached(script, layout, study)
    return [tpu.scp(str(study.path), tpu.remote(layout.config(study))), tpu.ssh(script)]


def status(args: argparse.Namespace) -> list[ll.Command]:
    tpu, layout = Tpu(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    plan = ll.plan_downloads(study, args, layout)
    return [tpu.ssh(ll.in_repo(layout, ll.sh(*ll.lgeo_words("status", study, args, layout, plan))), worker="0")]


def fetch(args: argparse.Namespace) -> list[ll.Command]:
    tpu, layout = Tpu(args), ll.layout_from(args)
    study = ll.Study.load(args.config, args.set)
    dest = args.fetch_to or f"runs/{args.name}"
    return [ll.command("mkdir", "-p", dest),
            tpu.scp(f"{args.name}:{ll.report_dir(study, args, layout)}", dest, worker="0", recurse=True)]


def delete(args: argparse.Namespace) -> list[ll.Command]:
    tpu = Tpu(args)
    return [ll.command(*tpu.gcloud("delete", args.name, *tpu.location), *(["--quiet"] if args.yes else []))]


def everything(args: argparse.Namespace) -> list[ll.Command]:
    return [*create(args), *setup(args), *run(args), *fetch(args)]


SUBCOMMANDS = {
    "create": (create, "create the TPU VM"),
    "setup": (setup, "install uv, jax[tpu] and the package on every worker; download checkpoint and Gemma Scope"),
    "run": (run, "copy the config and run `lgeo run` on all workers at once"),
    "status": (status, "`lgeo status` on worker 0: which stages are complete"),
    "fetch": (fetch, "copy report/ back from worker 0"),
    "delete": (delete, "delete the TPU VM"),
    "all": (everything, "create + setup + run + fetch"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/tpu/launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, (build, help_text) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.set_defaults(build=build)
        g = s.add_argument_group("TPU VM")
        g.add_argument("--name", required=True, help="TPU VM name")
        g.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
        g.add_argument("--project", help="GCP project (default: gcloud's configured one)")
        g.add_argument("--ssh-arg", action="append", default=[], metavar="FLAG",
                       help="extra gcloud ssh/scp flag (repeatable), e.g. --ssh-arg=--tunnel-through-iap")
        if name in ("create", "all", "run"):
            g.add_argument("--accelerator-type", required=name != "run",
                           help="e.g. v5litepod-8, v4-8 (single host), v4-32 (4 hosts)"
                                + ("; optional here: warns when a multi-host slice has no gs:// store"
                                   if name == "run" else ""))
        if name in ("create", "all"):
            g.add_argument("--runtime-version", help="TPU software version (default: from the accelerator type, "
                                                     "e.g. tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e)")
            g.add_argument("--spot", action="store_true", help="create a Spot VM (preemptible; rerun `run` to resume)")
            g.add_argument("--create-arg", action="append", default=[], metavar="FLAG",
                           help="extra `tpu-vm create` flag (repeatable), e.g. --create-arg=--service-account=SA")
        if name not in ("create", "delete"):
            ll.add_study_args(s)
        if name in ("setup", "all"):
            ll.add_install_args(s)
        if name == "run":
            ll.add_run_args(s, detach=True)
        if name in ("fetch", "all"):
            ll.add_fetch_args(s, "runs/NAME")
        if name == "delete":
            s.add_argument("--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")
        ll.add_dry_run(s)
    return p


def main(argv: list[str] | None = None) -> int:
    return ll.run_main(parser(), lambda args: args.build(args), argv)


if __name__ == "__main__":
    sys.exit(main())
