"""Stage directories under a run directory: manifests, staleness and resume.

A run directory holds one directory per pipeline stage (`runs/tiny/{data,base,adapters,corpus,saes,
analysis,report}`), each with a `manifest.json` recording what the stage's output was made from:
the hashes of the config sections it depends on and the fingerprints of the upstream manifests it
read. Comparing those with the current config and upstream manifests tells a stage whether it is
complete, resumable (interrupted with the same inputs), or stale (and which downstream stages that
invalidates). Progress entries (`committed_batches`, finished units) live in the same manifest.

Crash safety: every file is written atomically (`lgeo_jax.files`), a stage is complete only when its
manifest says so, and leftovers of an interrupted write (`.tmp-` in their name) are removed when the stage
resumes. Call the writing functions from one process (process 0 on multi-host runs). The loop that begins,
runs and finishes stages is `lgeo_jax.stages.run_stages`; inside a stage function::

    for unit in units:                            # e.g. "r4/L5"
        if stage.is_done(unit):
            continue
        with atomic_directory(stage.path / unit, overwrite=True) as tmp:
            write_outputs(tmp)
        stage.mark_done(unit)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lgeo_jax.files import TMP_MARK, atomic_write_json, json_hash, remove_temporaries
from lgeo_jax.study import StudyConfig, section_hashes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


# ---- the pipeline's stages ----------------------------------------------------------------------


class StageSpec(Protocol):
    """What the manifests need to know of a stage: the config sections its output depends on and the stages
    whose output it reads (`lgeo_jax.stages.Stage` is one)."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]


class Status(enum.Enum):
    """What a manifest says about its stage."""

    RUNNING = "running"
    COMPLETE = "complete"


class StageState(enum.Enum):
    """What a stage should do now."""

    MISSING = "missing"  # never started: run it
    RESUMABLE = "resumable"  # interrupted with the same config and inputs: continue from its progress
    COMPLETE = "complete"  # done with the same config and inputs: skip it
    STALE = "stale"  # made from a different config or inputs: rerun it from scratch


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The content of a stage's `manifest.json`."""

    stage: str
    status: Status
    instance: str  # new for every fresh start, so a rerun upstream is visible downstream
    sections: Mapping[str, str]  # section name -> section_hash
    inputs: Mapping[str, str]  # upstream stage -> its fingerprint when this stage started
    progress: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    done: tuple[str, ...] = ()  # finished units (e.g. "r4/L5"), each written atomically before listed
    created: str = ""
    updated: str = ""

    @property
    def fingerprint(self) -> str:
        """Identifies this output for downstream stages (progress and timestamps excluded)."""
        ident = {
            "stage": self.stage,
            "instance": self.instance,
            "sections": dict(self.sections),
            "inputs": dict(self.inputs),
        }
        return json_hash(ident)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "status": self.status.value,
            "instance": self.instance,
            "fingerprint": self.fingerprint,
            "sections": dict(self.sections),
            "inputs": dict(self.inputs),
            "progress": dict(self.progress),
            "done": list(self.done),
            "created": self.created,
            "updated": self.updated,
        }

    @classmethod
    def from_json(cls, value: Any, source: str = MANIFEST_NAME) -> Manifest:
        try:
            if value["format"] != MANIFEST_FORMAT:
                raise ValueError(f"format {value['format']!r}, expected {MANIFEST_FORMAT}")
            manifest = cls(
                stage=value["stage"],
                status=Status(value["status"]),
                instance=value["instance"],
                sections=dict(value["sections"]),
                inputs=dict(value["inputs"]),
                progress=dict(value["progress"]),
                done=tuple(value["done"]),
                created=value["created"],
                updated=value["updated"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{source}: not a valid stage manifest ({type(e).__name__}: {e}); delete the "
                "stage directory or rerun the stage with force"
            ) from e
        if manifest.fingerprint != value.get("fingerprint"):
            raise ValueError(
                f"{source}: fingerprint does not match its content (edited by hand?); rerun the stage with force"
            )
        return manifest

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest | None:
        """The manifest at `path`, or None if there is none."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete the stage directory or rerun with force") from e
        return cls.from_json(value, source=os.fspath(path))


@dataclasses.dataclass(frozen=True)
class StageCheck:
    """A stage's state with the reasons, and the existing downstream work a rerun would invalidate."""

    stage: str
    state: StageState
    reasons: tuple[str, ...] = ()
    changed_sections: tuple[str, ...] = ()
    invalidated: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.stage}: {self.state.value}"
        if self.reasons:
            text += f" ({'; '.join(self.reasons)})"
        if self.invalidated:
            text += f"; invalidates {', '.join(self.invalidated)}"
        return text


# ---- a run directory ----------------------------------------------------------------------------


class Run:
    """The stages of one study under `root`, judged against `config`."""

    def __init__(self, root: str | os.PathLike, config: StudyConfig, pipeline: Sequence[StageSpec]):
        self.root = Path(root)
        self.pipeline = tuple(pipeline)
        self._specs = {spec.name: spec for spec in pipeline}
        seen: set[str] = set()
        for spec in pipeline:
            unknown = [i for i in spec.inputs if i not in seen]
            if unknown:
                raise ValueError(f"pipeline: stage '{spec.name}' reads {unknown}, which do not come before it")
            seen.add(spec.name)
        self._hashes = section_hashes(config)

    def spec(self, name: str) -> StageSpec:
        if name not in self._specs:
            raise ValueError(f"unknown stage '{name}'; stages are {', '.join(self._specs)}")
        return self._specs[name]

    def stage_dir(self, name: str) -> Path:
        return self.root / self.spec(name).name

    def manifest(self, name: str) -> Manifest | None:
        return Manifest.read(self.stage_dir(name) / MANIFEST_NAME)

    def downstream(self, name: str) -> tuple[str, ...]:
        """Every stage that reads `name`'s output, directly or through others, in pipeline order."""
        affected = {self.spec(name).name}
        for spec in self.pipeline:
            if affected.intersection(spec.inputs):
                affected.add(spec.name)
        return tuple(s.name for s in self.pipeline if s.name in affected and s.name != name)

    def check(self, name: str, *, force: bool = False) -> StageCheck:
        """This stage's state judged from its own manifest and its inputs' manifests on disk."""
        spec = self.spec(name)
        try:
            manifest = self.manifest(name)
        except ValueError as e:
            return self._stale(name, (str(e),), ())
        if manifest is None:
            return StageCheck(name, StageState.MISSING, invalidated=self._existing_downstream(name))
        changed = tuple(s for s in spec.sections if manifest.sections.get(s) != self._hashes[s])
        reasons = [f"config section '{s}' changed" for s in changed]
        for inp in spec.inputs:
            try:
                upstream = self.manifest(inp)
            except ValueError:
                upstream = None
            if upstream is None or upstream.status is not Status.COMPLETE:
                reasons.append(f"input '{inp}' is {'missing' if upstream is None else 'not complete'}")
            elif manifest.inputs.get(inp) != upstream.fingerprint:
                reasons.append(f"input '{inp}' was rerun since")
        if force:
            reasons.append("forced")
        if reasons:
            return self._stale(name, tuple(reasons), changed)
        state = StageState.COMPLETE if manifest.status is Status.COMPLETE else StageState.RESUMABLE
        return StageCheck(name, state)

    def plan(self, force: tuple[str, ...] = ()) -> list[StageCheck]:
        """Every stage's state, with a rerun upstream making finished downstream work stale."""
        for name in force:
            self.spec(name)
        checks: dict[str, StageCheck] = {}
        for spec in self.pipeline:
            check = self.check(spec.name, force=spec.name in force)
            rerun = [i for i in spec.inputs if checks[i].state in (StageState.STALE, StageState.MISSING)]
            if rerun and check.state in (StageState.COMPLETE, StageState.RESUMABLE):
                check = self._stale(spec.name, tuple(f"input '{i}' will rerun" for i in rerun), ())
            checks[spec.name] = check
        return list(checks.values())

    def begin(self, name: str, *, force: bool = False) -> StageRun:
        """Opens a stage for work: complete -> nothing to do (`StageRun.is_complete`); resumable ->
        its progress so far; missing, stale or forced -> a fresh, empty directory (the old output is kept
        under a temp name until `finish` drops it or `abort` restores it)."""
        check = self.check(name, force=force)
        if check.state is StageState.COMPLETE:
            return StageRun(self.stage_dir(name), self.manifest(name))
        if check.state is StageState.RESUMABLE:
            remove_temporaries(self.stage_dir(name))  # half-written files of the interrupted attempt
            return StageRun(self.stage_dir(name), self.manifest(name))
        spec = self.spec(name)
        inputs = {}
        for inp in spec.inputs:
            upstream = self.manifest(inp)
            if upstream is None or upstream.status is not Status.COMPLETE:
                raise ValueError(
                    f"stage '{name}' cannot start: its input stage '{inp}' is "
                    f"{'missing' if upstream is None else 'not complete'}; run '{inp}' first"
                )
            inputs[inp] = upstream.fingerprint
        directory = self.stage_dir(name)
        for leftover in self.root.glob(f"{directory.name}{TMP_MARK}*"):  # from a crash while clearing
            shutil.rmtree(leftover)
        previous = None
        if directory.exists():  # kept aside (under a temp name) until the new attempt finishes or fails
            previous = directory.with_name(f"{directory.name}{TMP_MARK}previous-{uuid.uuid4().hex[:8]}")
            os.replace(directory, previous)
        directory.mkdir(parents=True)
        now = _now()
        manifest = Manifest(
            stage=name,
            status=Status.RUNNING,
            instance=uuid.uuid4().hex,
            sections={s: self._hashes[s] for s in spec.sections},
            inputs=inputs,
            created=now,
            updated=now,
        )
        atomic_write_json(directory / MANIFEST_NAME, manifest.to_json())
        return StageRun(directory, manifest, previous=previous)

    def _existing_downstream(self, name: str) -> tuple[str, ...]:
        return tuple(d for d in self.downstream(name) if (self.stage_dir(d) / MANIFEST_NAME).exists())

    def _stale(self, name: str, reasons: tuple[str, ...], changed: tuple[str, ...]) -> StageCheck:
        return StageCheck(name, StageState.STALE, reasons, changed, self._existing_downstream(name))


class StageRun:
    """An open stage: records progress in its manifest (atomically) and marks it complete."""

    def __init__(self, path: Path, manifest: Manifest, previous: Path | None = None):
        self.path = path
        self._manifest = manifest
        self._previous = previous  # the output this attempt replaces, restored by `abort`

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def is_complete(self) -> bool:
        return self._manifest.status is Status.COMPLETE

    @property
    def progress(self) -> Mapping[str, Any]:
        return self._manifest.progress

    def is_done(self, unit: str) -> bool:
        return unit in self._manifest.done

    def update(self, **entries: Any) -> None:
        """Merges JSON-serialisable progress entries (e.g. `committed_batches=12`) into the manifest."""
        self._write(progress={**self._manifest.progress, **entries})

    def mark_done(self, *units: str) -> None:
        """Records finished units; write each unit's output atomically *before* marking it."""
        done = self._manifest.done + tuple(u for u in dict.fromkeys(units) if u not in self._manifest.done)
        self._write(done=done)

    def finish(self) -> None:
        """Marks the stage complete (downstream stages may now read it) and drops the output it replaced."""
        self._write(status=Status.COMPLETE)
        if self._previous is not None:
            shutil.rmtree(self._previous, ignore_errors=True)
            self._previous = None

    def abort(self) -> None:
        """After a failed attempt: puts back the output it was replacing, so bad input destroys nothing.
        A first attempt has nothing to put back and stays resumable."""
        if self._previous is not None:
            shutil.rmtree(self.path)
            os.replace(self._previous, self.path)
            self._previous = None

    def _write(self, **changes: Any) -> None:
        if self.is_complete:
            raise ValueError(f"stage '{self._manifest.stage}' is complete; begin it with force to change it")
        manifest = dataclasses.replace(self._manifest, updated=_now(), **changes)
        atomic_write_json(self.path / MANIFEST_NAME, manifest.to_json())
        self._manifest = manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
