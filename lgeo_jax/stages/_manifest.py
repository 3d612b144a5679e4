"""Stage directories under a run directory: manifests, staleness and resume.

A run directory holds one directory per pipeline stage (`runs/tiny/{data,base,adapters,corpus,saes,
analysis,report}`), each with a `manifest.json` recording what the stage's output was made from:
the hashes of the config sections it depends on and the fingerprints of the upstream manifests it
read. Comparing those with the current config and upstream manifests tells a stage whether it is
complete, resumable (interrupted with the same inputs), or stale (and which downstream stages that
invalidates). Progress entries (`committed_batches`, finished units) live in the same manifest.

A stage's identity covers everything its output is made from: the hashes of its config sections, of the
config values it reads from other sections (`StageSpec.reads`), the fingerprints of the files it reads
(`StageSpec.files`: checkpoints, adapter directories, data files, dictionaries) and of its input stages.

Crash safety: every file is written atomically (`lgeo_jax.files`), a stage is complete only when its
manifest says so, and leftovers of an interrupted write (`.tmp-` in their name) are removed when the stage
resumes. A rerun keeps the output it replaces as `<stage>.tmp-previous-XXXXXXXX` until it finishes (then
drops it) or fails (then puts it back, after the failed attempt's writers have gone quiet); a leftover of
a killed attempt is resolved at the next start (restored or removed, said in the log). lgeo never
replaces a directory it did not write: one without an lgeo manifest is refused by name. One process
writes a run directory at a time (`Run.lock`). Call the writing functions from one process (process 0 on
multi-process runs; the others see a stage through `Run.view`, which refuses to write). The loop that
begins, runs and finishes stages is `lgeo_jax.stages.run_stages`; inside a stage function::

    for unit in units:                            # e.g. "r4/L5"
        if stage.is_done(unit):
            continue
        with atomic_directory(stage.path / unit, overwrite=True) as tmp:
            write_outputs(tmp)
        stage.mark_done(unit)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lgeo_jax.config import to_plain
from lgeo_jax.files import (
    LOCK_NAME,
    TMP_MARK,
    atomic_write_json,
    fsync_dir,
    json_hash,
    locked_directory,
    paths_fingerprint,
    remove_temporaries,
    remove_tree,
    wait_until_quiet,
)
from lgeo_jax.study import StudyConfig, section_hashes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ROOT_FILES = ("config.yaml",)  # what lgeo writes at the top of a run directory besides the stage directories
_LEFTOVER = re.compile(rf"{re.escape(TMP_MARK)}(previous|failed)-[0-9a-f]{{8}}")  # after the stage name
log = logging.getLogger("lgeo")


class RollbackError(OSError):
    """A failed stage whose previous output could not be put back; the message says where it is kept."""


# ---- the pipeline's stages ----------------------------------------------------------------------


class StageSpec(Protocol):
    """What the manifests need to know of a stage (`lgeo_jax.stages.Stage` is one): the config sections its
    output depends on, the stages whose output it reads, `reads(config)` (config values it reads from other
    sections, by name: their hashes join its identity) and `files(config, run)` (label -> path of every file
    or directory it reads from outside the stage directories' manifests: their fingerprints join it too)."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    reads: Callable[[StudyConfig], Mapping[str, Any]]
    files: Callable[[StudyConfig, Run], Mapping[str, str | os.PathLike]]


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
    sections: Mapping[str, str]  # section name (or a `reads` key) -> its hash
    inputs: Mapping[str, str]  # upstream stage -> its fingerprint when this stage started
    progress: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # `files` label -> fingerprint at start
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
        if self.files:  # absent from manifests written before files were fingerprinted
            ident["files"] = dict(self.files)
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
            "files": dict(self.files),
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
                files=dict(value.get("files", {})),
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
        self.config = config
        self.pipeline = tuple(pipeline)
        self._specs = {spec.name: spec for spec in pipeline}
        seen: set[str] = set()
        for spec in pipeline:
            unknown = [i for i in spec.inputs if i not in seen]
            if unknown:
                raise ValueError(f"pipeline: stage '{spec.name}' reads {unknown}, which do not come before it")
            seen.add(spec.name)
        self._hashes = section_hashes(config)
        self._fingerprints: dict[str, str] = {}  # path -> fingerprint, for judging (`begin` takes fresh ones)

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

    # ---- what a stage's output is made from ----

    def config_keys(self, name: str) -> dict[str, str]:
        """The hashes a stage's manifest records: its sections, and each config value it reads elsewhere."""
        spec = self.spec(name)
        keys = {s: self._hashes[s] for s in spec.sections}
        for key, value in spec.reads(self.config).items():
            keys[key] = json_hash(to_plain(value))
        return keys

    def input_files(self, name: str) -> dict[str, tuple[Path, str]]:
        """label -> (path, fingerprint) of every file the stage reads (`StageSpec.files`); a path that cannot
        be read gets a fingerprint saying so (it differs from any recorded one, so the stage is stale)."""
        spec = self.spec(name)
        try:
            files = spec.files(self.config, self)
        except (OSError, ValueError) as e:  # e.g. a dictionary the config names but that is not there
            return {"input files": (self.root, f"unavailable: {e}")}
        out = {}
        for label, path in files.items():
            key = os.path.abspath(path)
            if key not in self._fingerprints:
                try:
                    self._fingerprints[key] = paths_fingerprint([path], with_mtime=True)
                except OSError as e:
                    self._fingerprints[key] = f"unavailable: {e}"
            out[label] = (Path(path), self._fingerprints[key])
        return out

    # ---- judging stages ----

    def check(self, name: str, *, force: bool = False) -> StageCheck:
        """This stage's state judged from its own manifest and its inputs' manifests on disk."""
        try:
            manifest = self.manifest(name)
        except ValueError as e:
            return self._stale(name, (str(e),), ())
        if manifest is None:
            return StageCheck(name, StageState.MISSING, invalidated=self._existing_downstream(name))
        return self._judge(name, manifest, force=force)

    def _judge(self, name: str, manifest: Manifest, *, force: bool = False) -> StageCheck:
        spec = self.spec(name)
        keys = self.config_keys(name)
        changed = tuple(k for k, h in keys.items() if manifest.sections.get(k) != h)
        reasons = [f"config {'section' if k in self._hashes else 'value'} '{k}' changed" for k in changed]
        for label, (path, fingerprint) in self.input_files(name).items():
            if manifest.files.get(label) != fingerprint:
                what = "unavailable" if fingerprint.startswith("unavailable") else "changed on disk"
                reasons.append(f"{label} ({path}) {what} since the stage ran")
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

    # ---- owning the directory ----

    @contextlib.contextmanager
    def lock(self, purpose: str = "") -> Iterator[None]:
        """Holds the run directory's lock (one writing process at a time; `lgeo_jax.files.locked_directory`)
        after checking that lgeo owns everything it may replace there (`check_ownership`)."""
        self.check_ownership()
        with locked_directory(self.root, purpose=purpose):
            yield

    def check_ownership(self) -> None:
        """Refuses a run directory holding, where lgeo writes, something lgeo did not write: a stage directory
        without lgeo's manifest, or a top-level `config.yaml` in a directory that is not an lgeo run."""
        if not self.root.is_dir():
            return
        foreign = [self.stage_dir(spec.name) for spec in self.pipeline if not self._is_ours(spec.name)]
        ours = (self.root / LOCK_NAME).exists() or any(
            (self.stage_dir(spec.name) / MANIFEST_NAME).exists() for spec in self.pipeline)
        if not ours:
            foreign += [self.root / name for name in ROOT_FILES if (self.root / name).exists()]
        if foreign:
            raise ValueError(
                f"{', '.join(map(str, foreign))}: not written by lgeo (no lgeo manifest), but lgeo would replace "
                f"{'it' if len(foreign) == 1 else 'them'}; nothing was changed. Move "
                f"{'it' if len(foreign) == 1 else 'them'} away or choose another run directory (--out)")

    def _is_ours(self, name: str) -> bool:
        directory = self.stage_dir(name)
        if not directory.exists():
            return True
        if not directory.is_dir():
            return False
        if not any(directory.iterdir()):
            return True  # created by `begin` just before a crash (nothing in it to lose)
        return _looks_like_manifest(directory / MANIFEST_NAME, name)

    # ---- leftovers of interrupted reruns ----

    def resolve_leftovers(self) -> list[str]:
        """Resolves every stage's `<stage>.tmp-previous-*` / `.tmp-failed-*` left by a killed or failed rerun
        (pipeline order, since judging a stage needs its inputs settled); returns what was done, for the log."""
        return [line for spec in self.pipeline for line in self._resolve(spec.name)]

    def _resolve(self, name: str) -> list[str]:
        """The output a killed rerun was replacing comes back if it is still complete for the current config
        and the attempt never finished (or left nothing usable); otherwise it is removed. A failed attempt's
        leftovers are removed."""
        directory, said = self.stage_dir(name), []
        if not self.root.is_dir():
            return said
        for leftover in sorted(self.root.glob(f"{name}{TMP_MARK}*")):
            kind = _LEFTOVER.fullmatch(leftover.name[len(name):])
            if kind is None:
                continue
            if kind.group(1) == "failed":
                remove_tree(leftover)
                said.append(f"{name}: removed {leftover.name} (what a failed attempt had written)")
                continue
            current, previous = _manifest_or_none(directory), _manifest_or_none(leftover)
            if current is not None and current.status is Status.COMPLETE:
                restore, why = False, "the rerun that replaced it completed"
            elif (previous is not None and previous.status is Status.COMPLETE
                  and self._judge(name, previous).state is StageState.COMPLETE):
                restore, why = True, "a rerun was interrupted and this output is still complete for this config"
            elif current is not None:
                restore, why = False, f"superseded by the interrupted attempt in {directory.name}/, which resumes"
            else:
                restore, why = True, f"{directory.name}/ held no usable attempt"
            if restore:
                _put_back(leftover, directory)
                said.append(f"{name}: restored the previous output from {leftover.name} ({why})")
            else:
                remove_tree(leftover)
                said.append(f"{name}: removed the previous output {leftover.name} ({why})")
        for line in said:
            log.info("%s", line)
        return said

    # ---- opening a stage ----

    def begin(self, name: str, *, force: bool = False) -> StageRun:
        """Opens a stage for work: complete -> nothing to do (`StageRun.is_complete`); resumable ->
        its progress so far; missing, stale or forced -> a fresh, empty directory (the old output is kept
        under a temp name until `finish` drops it or `abort` restores it)."""
        if not self._is_ours(name):
            self.check_ownership()  # raises, naming the directory
        self._resolve(name)
        self._fingerprints.clear()  # judge and record what is on disk now (an upstream stage may have written it)
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
        files = {label: fingerprint for label, (_, fingerprint) in self.input_files(name).items()}
        directory = self.stage_dir(name)
        previous = None
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()  # made by a `begin` that crashed before writing the manifest
        if directory.exists():  # kept aside (under a temp name) until the new attempt finishes or fails
            previous = directory.with_name(f"{directory.name}{TMP_MARK}previous-{uuid.uuid4().hex[:8]}")
            os.replace(directory, previous)
        directory.mkdir(parents=True)
        now = _now()
        manifest = Manifest(
            stage=name,
            status=Status.RUNNING,
            instance=uuid.uuid4().hex,
            sections=self.config_keys(name),
            inputs=inputs,
            files=files,
            created=now,
            updated=now,
        )
        atomic_write_json(directory / MANIFEST_NAME, manifest.to_json())
        return StageRun(directory, manifest, previous=previous)

    def view(self, name: str) -> StageRun:
        """A stage as the other processes of a multi-process job see it once process 0 has begun it: its
        directory and manifest, read-only (they write only their own files inside it)."""
        manifest = self.manifest(name)
        if manifest is None:
            raise ValueError(f"stage '{name}': no manifest in {self.stage_dir(name)} although process 0 began it; "
                             "the processes must share the run directory (--out on a shared filesystem)")
        return StageRun(self.stage_dir(name), manifest, writable=False)

    def _existing_downstream(self, name: str) -> tuple[str, ...]:
        return tuple(d for d in self.downstream(name) if (self.stage_dir(d) / MANIFEST_NAME).exists())

    def _stale(self, name: str, reasons: tuple[str, ...], changed: tuple[str, ...]) -> StageCheck:
        return StageCheck(name, StageState.STALE, reasons, changed, self._existing_downstream(name))


def _looks_like_manifest(path: Path, stage: str) -> bool:
    """True for a file lgeo wrote as `stage`'s manifest (even one that no longer validates)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and value.get("stage") == stage and "format" in value


def _manifest_or_none(directory: Path) -> Manifest | None:
    try:
        return Manifest.read(directory / MANIFEST_NAME)
    except (OSError, ValueError):
        return None


def _put_back(previous: Path, directory: Path) -> None:
    """Moves `previous` to `directory`, setting aside (then removing) whatever is there. Each step is a
    rename, so a crash between them leaves names the next `Run._resolve` understands."""
    failed = None
    if directory.exists():
        failed = directory.with_name(f"{directory.name}{TMP_MARK}failed-{uuid.uuid4().hex[:8]}")
        os.replace(directory, failed)
    os.replace(previous, directory)
    fsync_dir(directory.parent)
    if failed is not None:
        with contextlib.suppress(OSError):  # what is left is removed at the next start
            remove_tree(failed)


class StageRun:
    """An open stage: records progress in its manifest (atomically) and marks it complete."""

    def __init__(self, path: Path, manifest: Manifest, previous: Path | None = None, *, writable: bool = True):
        self.path = path
        self._manifest = manifest
        self._previous = previous  # the output this attempt replaces, restored by `abort`
        self._writable = writable  # False on the processes of a job other than process 0 (`Run.view`)

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
            previous, self._previous = self._previous, None
            with contextlib.suppress(OSError):  # a leftover is removed at the next start
                remove_tree(previous)

    def abort(self, cause: BaseException | None = None) -> None:
        """After a failed attempt: puts back the output it was replacing, so bad input destroys nothing.
        A first attempt has nothing to put back and stays resumable.

        Waits first until nothing writes into the attempt's directory any more (asynchronous writes the
        failure did not stop would otherwise land in, or race the removal of, whatever is there next). If the
        previous output cannot be put back, it stays complete under its temp name, the error says where, and
        the next start restores it.
        """
        if self._previous is None:
            return
        try:
            wait_until_quiet(self.path)
            _put_back(self._previous, self.path)
        except OSError as e:  # TimeoutError included
            failed = f"stage '{self._manifest.stage}' failed" + (f" ({cause})" if cause is not None else "")
            raise RollbackError(
                f"{failed}, and putting its previous output back failed too ({e}); the previous output is kept "
                f"at {self._previous} (the failed attempt is in {self.path}); the next lgeo run in this "
                "directory restores it") from e
        self._previous = None

    def _write(self, **changes: Any) -> None:
        if not self._writable:
            raise ValueError(f"stage '{self._manifest.stage}': only process 0 writes the manifest")
        if self.is_complete:
            raise ValueError(f"stage '{self._manifest.stage}' is complete; begin it with force to change it")
        manifest = dataclasses.replace(self._manifest, updated=_now(), **changes)
        atomic_write_json(self.path / MANIFEST_NAME, manifest.to_json())
        self._manifest = manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
