"""`lgeo`: the study's command line. Every stage command takes the same YAML config, `--out DIR` and
`--set dotted.key=value` overrides; each runs its stage after any unfinished stages it depends on.

A stage command holds the run directory's lock for its whole life (a second one on the same directory
exits at once, naming the holder; `lgeo status` still works), and SIGTERM (a timeout, SLURM, preemption)
is handled like Ctrl-C: the running stage rolls back what it was replacing, and a rerun resumes.

In a job of several processes (`--coordinator ...`) process 0 holds the lock and writes the run directory,
lgeo.log included; every process runs the same command and follows it (`lgeo_jax.stages.run_stages`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("lgeo")
log.propagate = False  # our messages go to the run's log file only, never a second copy on stderr
log.addHandler(logging.NullHandler())


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so the same rollback runs."""


def _add_config_args(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument("config", help="study config (YAML), e.g. configs/tiny.yaml")
    p.add_argument("--out", required=out_required, help="run directory (default: the config's run_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sae.l1=0.1 (repeatable)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="the mesh section's sizes, e.g. --mesh fsdp=4,model=2 (data, fsdp, model; N or auto)")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=os.environ.get("LGEO_COORDINATOR"), metavar="HOST:PORT",
                   help="process 0's address for jax.distributed (env LGEO_COORDINATOR); without it, TPU pods "
                        "and SLURM jobs are detected by JAX")
    p.add_argument("--num-processes", type=int, default=_env_int("LGEO_NUM_PROCESSES"), metavar="N",
                   help="processes in the job (env LGEO_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=_env_int("LGEO_PROCESS_ID"), metavar="I",
                   help="this process's index, 0..N-1 (env LGEO_PROCESS_ID)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"lgeo: error: env {name}={value!r} is not an integer") from None


def _mesh_overrides(text: str | None) -> list[str]:
    """`--mesh data=2,fsdp=4` as `mesh.data=2`, `mesh.fsdp=4` overrides (the mesh section validates them)."""
    from lgeo_jax.sharding import MESH_AXES

    if not text:
        return []
    out = []
    for item in text.split(","):
        axis, eq, size = item.partition("=")
        if not eq or axis.strip() not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: expected AXIS=N pairs separated by commas, AXIS one of "
                             f"{', '.join(MESH_AXES)} (e.g. --mesh fsdp=4,model=2)")
        out.append(f"mesh.{axis.strip()}={size.strip()}")
    return out


def _init_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` before anything touches a device: explicitly with --coordinator (all three
    flags), or where JAX detects the cluster itself (a multi-host TPU VM, a SLURM job of several tasks). CPU
    processes exchange collectives over gloo."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id (or LGEO_COORDINATOR, "
                             "LGEO_NUM_PROCESSES, LGEO_PROCESS_ID) go together; set all three")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id} is not in 0..{args.num_processes - 1}")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_S)
    elif _cluster_detected():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_S)


def _cluster_detected() -> bool:
    """A cluster JAX can describe itself: several SLURM tasks, or a TPU VM slice with several workers."""
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgeo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="dry run: model size, LoRA parameters, corpus disk and SAE memory")
    _add_config_args(p, out_required=False)
    p = sub.add_parser("status", help="which stages of a run are complete, resumable or stale")
    _add_config_args(p, out_required=False)
    for name, (_, help_text) in _stage_commands().items():
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p, out_required=False)
        _add_distributed_args(p)
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rerun STAGE (and so everything downstream) even if complete (repeatable)")
    p = sub.add_parser("export-sae", help="export a trained SAE directory to another library's format")
    p.add_argument("sae_dir")
    p.add_argument("--format", required=True, choices=["saelens", "gemmascope", "sparsify"])
    p.add_argument("--out", required=True)
    return parser


def _stage_commands() -> dict[str, tuple[str, str]]:
    """Command -> (the stage it completes, with everything upstream; help), from the pipeline's registry."""
    from lgeo_jax.stages import PIPELINE

    commands = {s.command: (s.name, s.help) for s in PIPELINE if s.command}
    return {**commands, "run": (PIPELINE[-1].name, "the whole study end to end (resumable)")}


def _load(args: argparse.Namespace, *, check_paths: bool):
    from lgeo_jax.study import load_config

    overrides = [*_mesh_overrides(args.mesh), *args.set]
    if args.out:
        overrides.append(f"run_dir={args.out}")
    return load_config(args.config, overrides, check_paths=check_paths)


@contextlib.contextmanager
def _run_log(root: Path) -> Iterator[None]:
    """lgeo.log and JAX's persistent compilation cache in the run directory, for the command's life."""
    import jax

    handler = logging.FileHandler(root / "lgeo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    jax.config.update("jax_compilation_cache_dir", str(root / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        yield
    except (KeyboardInterrupt, Terminated) as e:
        log.error("%s", "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted")
        raise
    except (ValueError, OSError) as e:
        log.error("%s", e)
        raise
    except Exception:
        log.error("unexpected error\n%s", traceback.format_exc())
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_stages(args: argparse.Namespace, target: str) -> int:
    import jax

    from lgeo_jax.stages import device_summary, open_run, run_stages, stage_devices

    config = _load(args, check_paths=True)
    _init_distributed(args)
    line, warning = device_summary(config)
    print(line, flush=True)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        print(f"{jax.process_count()} processes: each extracts its share of the corpus on its {len(stage_devices())} "
              "devices; process 0 writes the run directory", flush=True)
    root = Path(config.run_dir)
    echo = lambda line: print(line, flush=True)
    if jax.process_index() == 0:
        # the lock (and the check that lgeo owns the directory) before lgeo.log is written into it
        with open_run(config).lock(purpose=f"lgeo {args.command}"), _run_log(root):
            log.info("%s", line)
            if warning:
                log.warning("%s", warning)
            outcomes = run_stages(config, target, force=tuple(args.force), echo=echo)
    else:  # takes no lock and writes no log: process 0 owns the directory (`run_stages` follows it)
        outcomes = run_stages(config, target, force=tuple(args.force), echo=echo)
    print("\nSummary")
    for o in outcomes:
        print(f"  {o.name:<9} {'done' if o.ran else 'skipped (complete)':<20} {o.seconds:8.1f} s")
    report = root / "report" / "report.md"
    if report.exists():
        print(f"\nReport: {report}")
    print(f"Run directory: {root}  (log: {root / 'lgeo.log'})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lgeo_jax.stages import plan_refusal, plan_text

    config = _load(args, check_paths=False)
    print(plan_text(config))
    refusal = plan_refusal(config)
    if refusal:
        print(f"lgeo: error: this mesh cannot hold the study: {refusal}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace) -> int:
    from lgeo_jax.files import lock_holder
    from lgeo_jax.stages import open_run

    config = _load(args, check_paths=False)
    holder = lock_holder(config.run_dir)
    if holder is not None:
        print(f"in use: {holder}; a stage shown as resumable may be the one running")
    for check in open_run(config).plan():
        print(check)
    return 0


def _export_sae(args: argparse.Namespace) -> int:
    from lgeo_jax.sae import export_sae

    export_sae(args.sae_dir, args.format, args.out)
    print(f"wrote {args.format} SAE to {args.out}")
    return 0


HEARTBEAT_S = 30
"""How long jax.distributed's coordination service waits for a silent process before it ends the whole job, so
a process killed mid-stage stops its peers within this time (jax's default is 100 s; heartbeats come from a
native thread, so a busy Python process still sends them)."""
TERM_GRACE_S = 30.0  # how long a SIGTERM waits for the main thread before the process ends anyway


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_handled() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread, so the running stage rolls back as for Ctrl-C. That thread
    sees it only once it runs Python again; one blocked in native code (a long XLA call, a hang) would not, so
    the signal's wakeup byte also reaches a watchdog thread at once, and if the process is still alive
    `TERM_GRACE_S` later it ends like a SIGKILL (a rerun resumes)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(read, 64):  # empty: the command is over
            if signal.SIGTERM in data:
                time.sleep(TERM_GRACE_S)
                sys.stderr.write(f"lgeo: still running {TERM_GRACE_S:.0f} s after SIGTERM; exiting now "
                                 "(rerun the same command to resume)\n")
                os.kill(os.getpid(), signal.SIGKILL)
        os.close(read)

    threading.Thread(target=watch, name="lgeo-sigterm", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write)
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _sigterm_handled():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from lgeo_jax.stages import PeerFailed

    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "status":
            return _status(args)
        if args.command == "export-sae":
            return _export_sae(args)
        return _run_stages(args, _stage_commands()[args.command][0])
    except KeyboardInterrupt:
        print("lgeo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("lgeo: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, OSError) as e:  # bad input: one clear message, no traceback
        print(f"lgeo: error: {e}", file=sys.stderr)
        return 2
    except PeerFailed as e:  # another process of the job failed: it printed why
        print(f"lgeo: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a bug: the run's log keeps the traceback (`_run_log`)
        print(f"lgeo: unexpected error: {type(e).__name__}: {e}\n(full traceback in the run's lgeo.log; "
              f"set LGEO_TRACEBACK=1 to print it)", file=sys.stderr)
        if os.environ.get("LGEO_TRACEBACK"):
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
