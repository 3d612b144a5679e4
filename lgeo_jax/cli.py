"""`lgeo`: the study's command line. Every stage command takes the same YAML config, `--out DIR` and
`--set dotted.key=value` overrides; each runs its stage after any unfinished stages it depends on."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

log = logging.getLogger("lgeo")
log.propagate = False  # our messages go to the run's log file only, never a second copy on stderr
log.addHandler(logging.NullHandler())

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
    for name, (_, help_text) in _stage_commands().items():
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p, out_required=False)
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
    from lgeo_jax.stages import run_stages

    config = _load(args, check_paths=True)
    root = Path(config.run_dir)
    _setup_run_dir(root)
    outcomes = run_stages(config, target, force=tuple(args.force), echo=lambda line: print(line, flush=True))
    print("\nSummary")
    for o in outcomes:
        print(f"  {o.name:<9} {'done' if o.ran else 'skipped (complete)':<20} {o.seconds:8.1f} s")
    report = root / "report" / "report.md"
    if report.exists():
        print(f"\nReport: {report}")
    print(f"Run directory: {root}  (log: {root / 'lgeo.log'})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lgeo_jax.stages import plan_text

    print(plan_text(_load(args, check_paths=False)))
    return 0


def _status(args: argparse.Namespace) -> int:
    from lgeo_jax.stages import open_run

    config = _load(args, check_paths=False)
    for check in open_run(config).plan():
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
        return _run_stages(args, _stage_commands()[args.command][0])
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
