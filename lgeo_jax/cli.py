"""`lgeo`: the study's command line. Every stage command takes the same YAML config, `--out DIR` and
`--set dotted.key=value` overrides; each runs its stage after any unfinished stages it depends on."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("lgeo")
log.propagate = False  # our messages go to the run's log file only, never a second copy on stderr
log.addHandler(logging.NullHandler())

# command -> the stage it completes (with everything upstream of it)
STAGE_COMMANDS = {
    "train-adapters": ("adapters", "train the LoRA adapters (all ranks in one jitted step)"),
    "extract": ("corpus", "extract base activations and adapter deltas into the tensorstore corpus"),
    "train-saes": ("saes", "train the delta SAEs (and base SAEs) together"),
    "analyze": ("analysis", "compute Tables 4-12 with null baselines"),
    "report": ("report", "write report.md, CSV/JSON and plots"),
    "run": ("report", "the whole study end to end (resumable)"),
}


def _add_config_args(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument("config", help="study config (YAML), e.g. configs/tiny.yaml")
    p.add_argument("--out", required=out_required, help="run directory (default: the config's run_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sae.l1=0.1 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgeo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="dry run: model size, LoRA parameters, corpus disk and SAE memory")
    _add_config_args(p, out_required=False)
    p = sub.add_parser("status", help="which stages of a run are complete, resumable or stale")
    _add_config_args(p, out_required=False)
    for name, (_, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p, out_required=False)
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rerun STAGE (and so everything downstream) even if complete (repeatable)")
    p = sub.add_parser("export-sae", help="export a trained SAE directory to another library's format")
    p.add_argument("sae_dir")
    p.add_argument("--format", required=True, choices=["saelens", "gemmascope", "sparsify"])
    p.add_argument("--out", required=True)
    return parser


def _load(args: argparse.Namespace, *, check_paths: bool):
    from lgeo_jax.config import load_config

    overrides = list(args.set)
    if args.out:
        overrides.append(f"run_dir={args.out}")
    return load_config(args.config, overrides, check_paths=check_paths)


def _setup_run_dir(root: Path) -> None:
    import jax

    root.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(root / "lgeo.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    jax.config.update("jax_compilation_cache_dir", str(root / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _run_stages(args: argparse.Namespace, target: str) -> int:
    from lgeo_jax.config import dump_config
    from lgeo_jax.manifest import Run, atomic_write_text
    from lgeo_jax.stages import STAGE_NAMES, stage_function, upstream_of

    config = _load(args, check_paths=True)
    unknown = [s for s in args.force if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"--force {unknown[0]!r}: unknown stage; stages are {', '.join(STAGE_NAMES)}")
    root = Path(config.run_dir)
    _setup_run_dir(root)
    run = Run(root, config)
    for check in run.plan(force=tuple(args.force)):
        log.info("%s", check)
    summary = []
    for name in upstream_of(target):
        stage = run.begin(name, force=name in args.force)
        if stage.is_complete:
            print(f"[{name}] complete, skipped")
            summary.append((name, "skipped (complete)", 0.0))
            continue
        print(f"[{name}] running ...", flush=True)
        log.info("stage %s: start", name)
        t0 = time.perf_counter()
        try:
            stage_function(name)(config, stage, run)
        except BaseException:
            stage.abort()  # a rerun that fails leaves the previous results as they were
            raise
        stage.finish()
        dt = time.perf_counter() - t0
        log.info("stage %s: done in %.1f s", name, dt)
        summary.append((name, "done", dt))
    atomic_write_text(root / "config.yaml", dump_config(config))  # the config these results come from
    print("\nSummary")
    for name, what, dt in summary:
        print(f"  {name:<9} {what:<20} {dt:8.1f} s")
    report = root / "report" / "report.md"
    if report.exists():
        print(f"\nReport: {report}")
    print(f"Run directory: {root}  (log: {root / 'lgeo.log'})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lgeo_jax.plan import plan_text

    print(plan_text(_load(args, check_paths=False)))
    return 0


def _status(args: argparse.Namespace) -> int:
    from lgeo_jax.manifest import Run

    config = _load(args, check_paths=False)
    for check in Run(config.run_dir, config).plan():
        print(check)
    return 0


def _export_sae(args: argparse.Namespace) -> int:
    from lgeo_jax.sae import export_sae

    export_sae(args.sae_dir, args.format, args.out)
    print(f"wrote {args.format} SAE to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "status":
            return _status(args)
        if args.command == "export-sae":
            return _export_sae(args)
        return _run_stages(args, STAGE_COMMANDS[args.command][0])
    except KeyboardInterrupt:
        print("lgeo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad input: one clear message, no traceback
        log.error("%s", e)
        print(f"lgeo: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: keep the traceback in the log, say where it is
        log.error("unexpected error\n%s", traceback.format_exc())
        print(f"lgeo: unexpected error: {type(e).__name__}: {e}\n(full traceback in the run's lgeo.log; "
              f"set LGEO_TRACEBACK=1 to print it)", file=sys.stderr)
        if os.environ.get("LGEO_TRACEBACK"):
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
