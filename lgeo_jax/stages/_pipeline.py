"""The pipeline, defined once: each stage's name, the config sections its output depends on, the stages it
reads, the function that runs it and the `lgeo` command that completes it; and `run_stages`, the one loop
that begins, runs, finishes (or, on failure, rolls back) them, used by the CLI and the tests alike."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lgeo_jax.files import atomic_write_text
from lgeo_jax.stages._adapters import run_adapters
from lgeo_jax.stages._analysis import run_analysis
from lgeo_jax.stages._base import run_base
from lgeo_jax.stages._corpus import run_corpus
from lgeo_jax.stages._data import run_data
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.stages._report import run_report
from lgeo_jax.stages._saes import run_saes
from lgeo_jax.study import StudyConfig, dump_config

log = logging.getLogger("lgeo")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage. `run(config, stage, run)` does the work inside `stage.path` (the caller owns the
    stage's lifecycle); `command` is the `lgeo` subcommand that runs the pipeline up to this stage."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    run: Callable[[StudyConfig, StageRun, Run], None]
    command: str | None = None
    help: str = ""


PIPELINE = (
    Stage("data", ("data",), (), run_data),  # records (synthetic ones written out) + tokenizer
    Stage("base", ("model",), ("data",), run_base),  # the base model (builtin: pretrained here)
    Stage("adapters", ("lora", "train"), ("data", "base"), run_adapters, "train-adapters",
          "train the LoRA adapters (all ranks in one jitted step)"),
    Stage("corpus", ("extract",), ("data", "base", "adapters"), run_corpus, "extract",
          "extract base activations and adapter deltas into the tensorstore corpus"),
    Stage("saes", ("sae",), ("corpus",), run_saes, "train-saes", "train the delta SAEs (and base SAEs) together"),
    Stage("analysis", ("analysis",), ("corpus", "saes"), run_analysis, "analyze",
          "compute Tables 4-12 with null baselines"),
    Stage("report", ("report",), ("analysis",), run_report, "report", "write report.md, CSV/JSON and plots"),
)
"""Inputs always precede their consumers (`Run` checks it)."""
STAGE_NAMES = tuple(s.name for s in PIPELINE)
CONFIG_FILE = "config.yaml"


def open_run(config: StudyConfig, pipeline: Sequence[Stage] = PIPELINE) -> Run:
    """The run directory `config.run_dir`, judged against `config`."""
    return Run(config.run_dir, config, pipeline)


def upstream_of(name: str, pipeline: Sequence[Stage] = PIPELINE) -> tuple[str, ...]:
    """`name` and every stage it depends on, in pipeline order."""
    specs = {s.name: s for s in pipeline}
    if name not in specs:
        raise ValueError(f"unknown stage '{name}'; stages are {', '.join(specs)}")
    needed, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(specs[n].inputs)
    return tuple(s.name for s in pipeline if s.name in needed)


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    name: str
    ran: bool  # False: it was complete and skipped
    seconds: float


def run_stages(config: StudyConfig, target: str = "report", *, force: Sequence[str] = (),
               pipeline: Sequence[Stage] = PIPELINE, echo: Callable[[str], None] = print) -> list[StageOutcome]:
    """Runs every stage up to `target` that is not complete (resuming interrupted ones), in order, then records
    the config the results come from in `run_dir/config.yaml`. A stage that fails restores its previous output
    (`StageRun.abort`), so a bad rerun never destroys finished results; `force` reruns the named stages."""
    run = open_run(config, pipeline)
    needed = upstream_of(target, pipeline)
    for check in run.plan(force=tuple(force)):  # also refuses unknown stage names in `force`
        log.info("%s", check)
    outcomes = []
    for spec in pipeline:
        if spec.name not in needed:
            continue
        stage = run.begin(spec.name, force=spec.name in force)
        if stage.is_complete:
            echo(f"[{spec.name}] complete, skipped")
            outcomes.append(StageOutcome(spec.name, False, 0.0))
            continue
        echo(f"[{spec.name}] running ...")
        log.info("stage %s: start", spec.name)
        t0 = time.perf_counter()
        try:
            spec.run(config, stage, run)
        except BaseException:
            stage.abort()  # a rerun that fails leaves the previous results as they were
            raise
        stage.finish()
        seconds = time.perf_counter() - t0
        log.info("stage %s: done in %.1f s", spec.name, seconds)
        outcomes.append(StageOutcome(spec.name, True, seconds))
    atomic_write_text(Path(config.run_dir) / CONFIG_FILE, dump_config(config))
    return outcomes
