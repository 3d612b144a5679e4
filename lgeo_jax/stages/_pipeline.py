"""The pipeline, defined once: each stage's name, the config sections its output depends on, the stages it
reads, the config values it reads from other sections and the files it reads (both part of its identity:
change one and the stage is stale), the function that runs it and the `lgeo` command that completes it;
and `run_stages`, the one loop that begins, runs, finishes (or, on failure, rolls back) them, used by the
CLI and the tests alike."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lgeo_jax.files import atomic_write_text
from lgeo_jax.stages._adapters import run_adapters
from lgeo_jax.stages._analysis import reference_path, run_analysis
from lgeo_jax.stages._base import run_base
from lgeo_jax.stages._corpus import run_corpus
from lgeo_jax.stages._crosscoders import crosscoder_reads, run_crosscoders
from lgeo_jax.stages._data import run_data
from lgeo_jax.stages._evaluate import evaluate_reads, run_evaluate
from lgeo_jax.stages._layout import adapter_dirs, base_checkpoint
from lgeo_jax.stages._manifest import Run, StageCheck, StageRun, StageState
from lgeo_jax.stages._peers import Peers, job_peers
from lgeo_jax.stages._plan import check_resources
from lgeo_jax.stages._report import run_report
from lgeo_jax.stages._saes import run_saes, trains_base_saes
from lgeo_jax.study import StudyConfig, dump_config

log = logging.getLogger("lgeo")


def _no_reads(config: StudyConfig) -> Mapping[str, Any]:
    return {}


def _no_files(config: StudyConfig, run: Run) -> Mapping[str, str | os.PathLike]:
    return {}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage. `run(config, stage, run)` does the work inside `stage.path` (the caller owns the
    stage's lifecycle); `command` is the `lgeo` subcommand that runs the pipeline up to this stage.

    `sections` and the sections of every stage upstream cover most of what a stage reads; `reads(config)`
    names the rest (config value -> what the stage uses of it) and `files(config, run)` the files and
    directories it reads that no upstream manifest vouches for (label -> path). A test derives both from
    the stage functions themselves (tests/test_pipeline.py).

    In a job of several processes a stage runs on process 0 alone, on its own devices, unless
    `every_process`: then every process runs `run` and does its share (the corpus)."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    run: Callable[[StudyConfig, StageRun, Run], None]
    command: str | None = None
    help: str = ""
    reads: Callable[[StudyConfig], Mapping[str, Any]] = _no_reads
    files: Callable[[StudyConfig, Run], Mapping[str, str | os.PathLike]] = _no_files
    every_process: bool = False


def _data_files(config: StudyConfig, run: Run) -> dict[str, str]:
    data, files = config.data, {}
    if not data.is_synthetic and os.path.exists(data.source):  # a hub id has no local file to fingerprint
        files["data.source"] = data.source
    if data.tokenizer:
        files["data.tokenizer"] = data.tokenizer
    return files


def _base_files(config: StudyConfig, run: Run) -> dict[str, str]:
    return {} if config.model.is_builtin else {"model.checkpoint": config.model.checkpoint}


def _weights_files(config: StudyConfig, run: Run, *, adapters: bool) -> dict[str, Path]:
    """The base checkpoint (the user's or the one the base stage wrote) and, for the corpus, the adapters."""
    files = {"base checkpoint": base_checkpoint(run, config)}
    if adapters:
        files.update({f"adapter {path.name}": path for path in adapter_dirs(run, config)})
    return files


def _analysis_files(config: StudyConfig, run: Run) -> dict[str, Path]:
    return {f"reference dictionary of layer {layer}": reference_path(config, run, layer)
            for layer in config.extract.layers if config.analysis.has_external_dictionary(layer)}


def _analysis_stage_files(config: StudyConfig, run: Run) -> dict[str, Path]:
    """The reference dictionaries and the adapters, whose LoRA factors give the write span (`lora_span`)."""
    return {**_analysis_files(config, run), **{f"adapter {path.name}": path for path in adapter_dirs(run, config)}}


def _plots(config: StudyConfig) -> dict[str, Any]:
    return {"report.plots": config.report.plots}


def _saes_reads(config: StudyConfig) -> dict[str, Any]:
    return {**_plots(config), "analysis.eval_split": config.analysis.eval_split,
            "base SAEs trained (sae.base_saes, analysis.gemma_scope_dir, analysis.dictionary_dirs)":
                trains_base_saes(config)}


PIPELINE = (
    Stage("data", ("data",), (), run_data, files=_data_files),  # records (synthetic ones written out) + tokenizer
    Stage("base", ("model",), ("data",), run_base, files=_base_files),  # the base model (builtin: pretrained here)
    Stage("adapters", ("lora", "train"), ("data", "base"), run_adapters, "train-adapters",
          "train the LoRA adapters (all ranks in one jitted step)", reads=_plots,
          files=lambda config, run: _weights_files(config, run, adapters=False)),
    Stage("corpus", ("extract",), ("data", "base", "adapters"), run_corpus, "extract",
          "extract base activations and adapter deltas into the tensorstore corpus",
          files=lambda config, run: _weights_files(config, run, adapters=True), every_process=True),
    Stage("saes", ("sae",), ("corpus",), run_saes, "train-saes", "train the delta SAEs (and base SAEs) together",
          reads=_saes_reads),
    Stage("crosscoders", ("crosscoder",), ("corpus", "saes"), run_crosscoders, "train-crosscoders",
          "train base/adapted crosscoders (crosscoder.enabled) and analyse their latents", reads=crosscoder_reads),
    Stage("evaluate", ("splice",), ("data", "base", "adapters", "saes"), run_evaluate, "evaluate",
          "splice evaluation (splice.enabled): the adapted model with its residual at each layer reconstructed",
          reads=evaluate_reads, files=_analysis_files),
    Stage("analysis", ("analysis",), ("corpus", "saes"), run_analysis, "analyze",
          "compute Tables 4-12 with null baselines", files=_analysis_stage_files),
    Stage("report", ("report",), ("analysis", "crosscoders", "evaluate"), run_report, "report",
          "write report.md, CSV/JSON and plots"),
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
    the config the results come from in `run_dir/config.yaml`.

    Holds the run directory's lock throughout (a second writer is refused at once), resolves what killed
    reruns left behind, and refuses, before any stage starts, a run whose stages cannot fit this machine
    (`check_resources`). Says on `echo` which stages run and why. A stage that fails restores its previous
    output (`StageRun.abort`), so a bad rerun never destroys finished results; `force` reruns the named
    stages.

    In a job of several processes (`jax.distributed`) every process calls this: process 0 does all of the
    above and decides; the others take no lock, write nothing but their share of an `every_process` stage,
    and follow process 0's decisions stage by stage (`lgeo_jax.stages._peers`: each stage is begun, run and
    finished in step, and a failure anywhere stops every process). Such a job runs only `every_process`
    stages (the corpus); one that would run another is refused before anything starts (`_check_shared`)."""
    peers = job_peers()
    try:
        if peers.is_writer:
            return _lead(config, target, force, pipeline, echo, peers)
        return _follow(config, target, pipeline, echo, peers)
    except BaseException as error:
        peers.fail(error)
        raise


def _lead(config: StudyConfig, target: str, force: Sequence[str], pipeline: Sequence[Stage],
          echo: Callable[[str], None], peers: Peers) -> list[StageOutcome]:
    run = open_run(config, pipeline)
    needed = upstream_of(target, pipeline)
    with run.lock(purpose=f"stages up to {target}"):
        for line in run.resolve_leftovers():
            echo(f"[{line.partition(':')[0]}] {line.partition(': ')[2]}")
        plan = {check.stage: check for check in run.plan(force=tuple(force))}  # refuses unknown names in `force`
        for check in plan.values():
            log.info("%s", check)
        check_resources(config, [name for name in needed if plan[name].state is not StageState.COMPLETE])
        _check_shared(run, needed, plan, peers)
        peers.exchange("start")
        outcomes = []
        for spec in pipeline:
            if spec.name not in needed:
                continue
            stage = run.begin(spec.name, force=spec.name in force)
            peers.exchange(f"begin {spec.name}", not stage.is_complete)  # the others learn whether it runs
            if stage.is_complete:
                echo(f"[{spec.name}] complete, skipped")
                outcomes.append(StageOutcome(spec.name, False, 0.0))
                continue
            echo(_starting(plan[spec.name]))
            log.info("stage %s: start", spec.name)
            t0 = time.perf_counter()
            try:
                spec.run(config, stage, run)
                peers.exchange(f"ran {spec.name}")  # every process's share is done (or one failed: raises)
            except BaseException as error:
                stage.abort(error)  # a rerun that fails leaves the previous results as they were
                raise
            stage.finish()
            seconds = time.perf_counter() - t0
            log.info("stage %s: done in %.1f s", spec.name, seconds)
            outcomes.append(StageOutcome(spec.name, True, seconds))
        atomic_write_text(Path(config.run_dir) / CONFIG_FILE, dump_config(config))
        peers.exchange("done")
    return outcomes


def _check_shared(run: Run, needed: Sequence[str], plan: Mapping[str, StageCheck], peers: Peers) -> None:
    """Refuses a job of several processes that would run a stage other than an `every_process` one: the trainers'
    orbax checkpoints refuse arrays of one process's devices in a multi-process job ("Cannot serialize host
    local jax.Array"), and training over every host's devices is a further step (issue 13, Build item 2)."""
    alone = [n for n in needed if plan[n].state is not StageState.COMPLETE and not run.spec(n).every_process]
    if peers.count > 1 and alone:
        shared = [spec for spec in run.pipeline if spec.every_process]
        first = run.pipeline.index(shared[0])
        before = next(spec.command for spec in reversed(run.pipeline[:first]) if spec.command)
        raise ValueError(
            f"a job of {peers.count} processes runs only the stages every process shares "
            f"({', '.join(spec.name for spec in shared)}), but {', '.join(alone)} would run too: run `lgeo {before}` "
            f"in a one-process job first, then `lgeo {shared[0].command}` on every process, then `lgeo run` in a "
            "one-process job for the rest")


def _follow(config: StudyConfig, target: str, pipeline: Sequence[Stage], echo: Callable[[str], None],
            peers: Peers) -> list[StageOutcome]:
    """A process other than 0: the same stages in step with process 0, running the `every_process` ones (process 0
    refuses a job that would run any other, `_check_shared`)."""
    run = open_run(config, pipeline)
    peers.exchange("start")  # process 0 holds the lock and has checked the directory and the machine
    run.check_ownership()
    outcomes = []
    for spec in pipeline:
        if spec.name not in upstream_of(target, pipeline):
            continue
        (runs, *_) = peers.exchange(f"begin {spec.name}")
        if not runs:
            outcomes.append(StageOutcome(spec.name, False, 0.0))
            continue
        t0 = time.perf_counter()
        echo(f"[{spec.name}] running this process's share (process {peers.index} of {peers.count}) ...")
        spec.run(config, run.view(spec.name), run)
        peers.exchange(f"ran {spec.name}")
        outcomes.append(StageOutcome(spec.name, True, time.perf_counter() - t0))
    peers.exchange("done")
    return outcomes


def _starting(check: StageCheck) -> str:
    """What the user reads as a stage starts: a fresh run, a resumed one, or a rerun and why."""
    if check.state is StageState.RESUMABLE:
        return f"[{check.stage}] resuming the interrupted run ..."
    if check.state is StageState.STALE:
        return f"[{check.stage}] {'; '.join(check.reasons)}: rerunning ..."
    return f"[{check.stage}] running ..."
