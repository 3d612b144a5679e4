"""Stage manifests: staleness names downstream stages (config sections, values read across sections, files
replaced in place), failed reruns restore (after their writers stop), killed reruns are resolved at the next
start, resume works, and lgeo never replaces a directory it did not write."""

import json
import os
import threading
import time

import pytest

from lgeo_jax.files import is_temporary
from lgeo_jax.stages import (
    MANIFEST_NAME,
    PIPELINE,
    STAGE_NAMES,
    Manifest,
    RollbackError,
    Run,
    Stage,
    StageState,
    Status,
)
from lgeo_jax.study import config_from_yaml

CONFIG = """\
model:
  checkpoint: builtin:tiny
  builtin: {d_model: 32, n_layers: 4, n_heads: 2, n_kv_heads: 1, head_dim: 16, mlp_dim: 64}
data: {source: builtin:synthetic, train: [0, 200], probe: [100, 200], heldout: [200, 300]}
lora: {ranks: [4, 8]}
extract: {layers: [1, 2]}
sae: {width: 64}
analysis: {subspace_k: 8}
"""


def _run(root, config):
    return Run(root, config, PIPELINE)


def _config(*overrides):
    return config_from_yaml(CONFIG, list(overrides))


def _run_all(run, upto=None):
    for spec in run.pipeline:
        stage = run.begin(spec.name)
        (stage.path / "out.txt").write_text(spec.name)
        stage.finish()
        if spec.name == upto:
            return


def _states(run, force=()):
    return {c.stage: c.state for c in run.plan(force)}


# ---- stage states ---------------------------------------------------------------------------------


def test_fresh_run_is_all_missing_and_inputs_must_complete_first(tmp_path):
    run = _run(tmp_path, _config())
    assert set(_states(run).values()) == {StageState.MISSING}
    with pytest.raises(ValueError, match="stage 'adapters' cannot start: its input stage 'data' is missing"):
        run.begin("adapters")
    run.begin("data")  # running, not complete
    with pytest.raises(ValueError, match="input stage 'data' is not complete"):
        run.begin("base")


def test_complete_pipeline_is_skipped(tmp_path):
    run = _run(tmp_path, _config())
    _run_all(run)
    assert set(_states(run).values()) == {StageState.COMPLETE}
    again = _run(tmp_path, _config()).begin("saes")
    assert again.is_complete and (again.path / "out.txt").read_text() == "saes"
    manifest = Manifest.read(tmp_path / "saes" / MANIFEST_NAME)
    assert manifest.inputs == {"corpus": Manifest.read(tmp_path / "corpus" / MANIFEST_NAME).fingerprint}


def test_changed_section_names_itself_and_every_downstream_stage(tmp_path):
    _run_all(_run(tmp_path, _config()))
    run = _run(tmp_path, _config("lora.dropout=0.1"))
    check = run.check("adapters")
    assert check.state is StageState.STALE and check.changed_sections == ("lora",)
    assert check.invalidated == ("corpus", "saes", "crosscoders", "evaluate", "analysis", "report")
    assert str(check) == ("adapters: stale (config section 'lora' changed); invalidates corpus, saes, crosscoders, "
                          "evaluate, analysis, report")
    states = _states(run)
    assert [s for s, v in states.items() if v is StageState.STALE] == [
        "adapters",
        "corpus",
        "saes",
        "crosscoders",
        "evaluate",
        "analysis",
        "report",
    ]
    assert states["data"] is states["base"] is StageState.COMPLETE
    assert run.plan()[3].reasons == ("input 'adapters' will rerun",)


def test_data_change_invalidates_everything_and_other_sections_nothing_upstream(tmp_path):
    _run_all(_run(tmp_path, _config()))
    assert set(_states(_run(tmp_path, _config("data.max_length=64"))).values()) == {StageState.STALE}
    states = _states(_run(tmp_path, _config("sae.l1=0.3")))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["saes", "crosscoders", "evaluate", "analysis",
                                                                       "report"]


def test_operational_change_keeps_finished_work(tmp_path):
    _run_all(_run(tmp_path, _config()))
    run = _run(tmp_path, _config("extract.batch_size=99", "train.checkpoint_every=3", "analysis.max_cosine_chunk=64"))
    assert set(_states(run).values()) == {StageState.COMPLETE}


def test_rerun_upstream_makes_downstream_stale_by_fingerprint(tmp_path):
    run = _run(tmp_path, _config())
    _run_all(run)
    old = run.manifest("corpus").fingerprint
    fresh = run.begin("corpus", force=True)
    assert not fresh.is_complete and list(fresh.path.iterdir()) == [fresh.path / MANIFEST_NAME]  # old output gone
    fresh.finish()
    assert run.manifest("corpus").fingerprint != old
    check = run.check("saes")
    assert check.state is StageState.STALE and check.reasons == ("input 'corpus' was rerun since",)
    assert check.invalidated == ("crosscoders", "evaluate", "analysis", "report")


def test_force_in_plan_marks_downstream(tmp_path):
    run = _run(tmp_path, _config())
    _run_all(run)
    states = _states(run, force=("saes",))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["saes", "crosscoders", "evaluate", "analysis",
                                                                       "report"]
    with pytest.raises(ValueError, match="unknown stage 'sea'"):
        run.plan(force=("sea",))


def test_stale_begin_starts_from_an_empty_directory(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="adapters")
    run = _run(tmp_path, _config("lora.ranks=[4, 16]"))
    stage = run.begin("adapters")
    assert not stage.is_complete and not (stage.path / "out.txt").exists()
    # the replaced output waits under a temp name (never looks complete) until the attempt ends
    assert len([p for p in tmp_path.iterdir() if is_temporary(p)]) == 1
    stage.finish()
    assert [p.name for p in tmp_path.iterdir() if is_temporary(p)] == []


def test_failed_rerun_restores_the_previous_output(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="adapters")
    before = (tmp_path / "adapters" / "out.txt").read_text()
    manifest_before = (tmp_path / "adapters" / "manifest.json").read_text()
    stage = _run(tmp_path, _config()).begin("adapters", force=True)
    (stage.path / "partial.bin").write_bytes(b"half")
    stage.abort()  # the stage function raised
    assert (tmp_path / "adapters" / "out.txt").read_text() == before
    assert (tmp_path / "adapters" / "manifest.json").read_text() == manifest_before
    assert not (tmp_path / "adapters" / "partial.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if is_temporary(p)] == []
    assert _run(tmp_path, _config()).check("adapters").state.value == "complete"


# ---- resume bookkeeping ---------------------------------------------------------------------------


def test_interrupted_stage_resumes_with_its_progress(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="corpus")
    stage = _run(tmp_path, _config()).begin("saes")
    stage.update(committed_batches=3, tokens=1536)
    stage.mark_done("r4/L1", "r4/L2")
    stage.mark_done("r4/L1")  # idempotent
    instance = stage.manifest.instance
    del stage  # the process dies here

    half = tmp_path / "saes" / "r8.tmp-1234"  # an atomic_directory the crash interrupted
    half.mkdir()
    (half / "weights.bin").write_bytes(b"partial")

    run = _run(tmp_path, _config())
    assert run.check("saes").state is StageState.RESUMABLE
    assert _states(run)["analysis"] is StageState.MISSING
    resumed = run.begin("saes")
    assert resumed.manifest.instance == instance
    assert dict(resumed.progress) == {"committed_batches": 3, "tokens": 1536}
    assert resumed.is_done("r4/L2") and not resumed.is_done("r8/L1")
    assert not half.exists()
    resumed.update(committed_batches=5)
    resumed.mark_done("r8/L1", "r8/L2")
    resumed.finish()
    final = run.manifest("saes")
    assert final.done == ("r4/L1", "r4/L2", "r8/L1", "r8/L2") and final.progress["committed_batches"] == 5
    assert run.check("saes").state is StageState.COMPLETE
    with pytest.raises(ValueError, match="stage 'saes' is complete"):
        run.begin("saes").update(committed_batches=6)


def test_interrupted_stage_with_changed_config_is_stale_not_resumed(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="corpus")
    stage = _run(tmp_path, _config()).begin("saes")
    stage.update(committed_batches=3)
    run = _run(tmp_path, _config("sae.width=128"))
    assert run.check("saes").state is StageState.STALE
    assert dict(run.begin("saes").progress) == {}


def test_corrupt_or_edited_manifest_is_stale(tmp_path):
    run = _run(tmp_path, _config())
    _run_all(run, upto="base")
    path = tmp_path / "base" / MANIFEST_NAME
    value = json.loads(path.read_text())
    value["sections"]["model"] = "0" * 16  # hand edit without updating the fingerprint
    path.write_text(json.dumps(value))
    check = run.check("base")
    assert check.state is StageState.STALE and "fingerprint does not match" in check.reasons[0]
    path.write_text("{not json")
    assert "not valid JSON" in run.check("base").reasons[0]
    assert run.check("adapters").state is StageState.MISSING


def test_custom_pipeline_order_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"stage 'b' reads \['c'\], which do not come before it"):
        Run(tmp_path, _config(), pipeline=(Stage("b", ("sae",), ("c",), print), Stage("c", ("sae",), (), print)))
    assert [s.name for s in PIPELINE] == ["data", "base", "adapters", "corpus", "saes", "crosscoders", "evaluate",
                                           "analysis", "report"]


# ---- never replacing what lgeo did not write ---------------------------------------------------------


def test_a_user_folder_named_like_a_stage_is_refused_and_kept(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_dataset.csv").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")  # not where lgeo writes: no objection
    run = _run(tmp_path, _config())
    with pytest.raises(ValueError, match=rf"{tmp_path / 'data'}: not written by lgeo \(no lgeo manifest\)"):
        with run.lock():
            pass
    with pytest.raises(ValueError, match="not written by lgeo"):
        run.begin("data")
    assert (tmp_path / "data" / "my_dataset.csv").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]  # not even a lock file was made


def test_a_config_yaml_in_a_directory_lgeo_never_ran_in_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("# my own notes\n")
    run = _run(tmp_path, _config())
    with pytest.raises(ValueError, match="config.yaml: not written by lgeo"):
        run.check_ownership()
    (tmp_path / "config.yaml").unlink()
    with run.lock():  # an lgeo run directory from now on (its lock file), so its config.yaml is lgeo's
        _run_all(run)
    (tmp_path / "config.yaml").write_text("written by lgeo at the end of a run\n")
    run.check_ownership()


def test_an_empty_stage_directory_left_by_a_crash_is_reused(tmp_path):
    (tmp_path / "data").mkdir()
    run = _run(tmp_path, _config())
    run.check_ownership()
    run.begin("data").finish()
    assert run.check("data").state is StageState.COMPLETE


# ---- leftovers of killed reruns ----------------------------------------------------------------------


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if is_temporary(p))


def test_killed_forced_rerun_restores_the_previous_output(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="corpus")
    before = (tmp_path / "corpus" / MANIFEST_NAME).read_text()
    stage = _run(tmp_path, _config()).begin("corpus", force=True)
    (stage.path / "partial.bin").write_bytes(b"half")
    del stage  # SIGKILL: no abort
    assert len(_leftovers(tmp_path)) == 1
    run = _run(tmp_path, _config())
    said = run.resolve_leftovers()
    assert len(said) == 1 and said[0].startswith("corpus: restored the previous output from corpus.tmp-previous-")
    assert (tmp_path / "corpus" / MANIFEST_NAME).read_text() == before
    assert (tmp_path / "corpus" / "out.txt").read_text() == "corpus" and _leftovers(tmp_path) == []
    assert run.check("corpus").state is StageState.COMPLETE


def test_killed_stale_rerun_keeps_the_new_attempt_and_drops_the_stale_output(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="saes")
    stage = _run(tmp_path, _config("sae.l1=0.3")).begin("saes")  # stale: the config changed
    stage.update(committed=1)
    del stage
    run = _run(tmp_path, _config("sae.l1=0.3"))
    (line,) = run.resolve_leftovers()
    assert "removed the previous output saes.tmp-previous-" in line and "superseded by the interrupted" in line
    assert _leftovers(tmp_path) == [] and run.check("saes").state is StageState.RESUMABLE
    # had the user gone back to the old config instead, the old output would have come back
    _run_all(_run(tmp_path / "b", _config()), upto="saes")
    _run(tmp_path / "b", _config("sae.l1=0.3")).begin("saes")
    (line,) = _run(tmp_path / "b", _config()).resolve_leftovers()
    assert "restored the previous output" in line
    assert _run(tmp_path / "b", _config()).check("saes").state is StageState.COMPLETE


def test_leftover_after_a_finished_rerun_or_a_crash_while_setting_aside(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="base")
    stage = _run(tmp_path, _config()).begin("base", force=True)
    stage._write(status=Status.COMPLETE)  # killed inside finish(), after the manifest, before the removal
    (line,) = _run(tmp_path, _config()).resolve_leftovers()
    assert "removed the previous output base.tmp-previous-" in line and "completed" in line
    # killed between setting the old output aside and writing the new manifest: it comes back
    previous = tmp_path / "base.tmp-previous-0123abcd"
    os.replace(tmp_path / "base", previous)
    (tmp_path / "base").mkdir()
    (line,) = _run(tmp_path, _config()).resolve_leftovers()
    assert "restored" in line and (tmp_path / "base" / MANIFEST_NAME).is_file()
    failed = tmp_path / "base.tmp-failed-0123abcd"  # a failed attempt whose removal was interrupted
    failed.mkdir()
    (failed / "x").write_text("x")
    user = tmp_path / "base.tmp-mine"  # not a name lgeo makes: left alone
    user.mkdir()
    (line,) = _run(tmp_path, _config()).resolve_leftovers()
    assert "removed base.tmp-failed-0123abcd" in line and not failed.exists() and user.exists()


# ---- stale detection sees every input ----------------------------------------------------------------


def test_config_values_read_across_sections_make_their_readers_stale(tmp_path):
    _run_all(_run(tmp_path, _config()))
    states = _states(_run(tmp_path, _config("report.plots=false")))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["adapters", "corpus", "saes", "crosscoders",
                                                                       "evaluate", "analysis",
                                                                       "report"]
    run = _run(tmp_path, _config("analysis.eval_split=probe"))
    assert run.check("saes").reasons == ("config value 'analysis.eval_split' changed",)
    # the Gemma Scope folder name matters to the analysis only
    states = _states(_run(tmp_path, _config("analysis.gemma_scope_width=width_65k")))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["analysis", "report"]


def _config_with_files(tmp_path, *overrides):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights v1")
    source = tmp_path / "alpaca.json"
    if not source.exists():
        source.write_text("[]")
    (tmp_path / "tokenizer").mkdir(exist_ok=True)
    builtin = CONFIG[CONFIG.index("  checkpoint:"):CONFIG.index("data:")]
    text = CONFIG.replace(builtin, f"  checkpoint: {checkpoint}\n  n_layers: 4\n")
    text = text.replace("source: builtin:synthetic", f"source: {source}")
    return config_from_yaml(text, [f"run_dir={tmp_path / 'run'}", f"data.tokenizer={tmp_path / 'tokenizer'}",
                                   *overrides])


def test_files_replaced_in_place_make_their_readers_stale(tmp_path):
    config = _config_with_files(tmp_path)
    _run_all(_run(tmp_path / "run", config))
    assert set(_states(_run(tmp_path / "run", config)).values()) == {StageState.COMPLETE}
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights v2")  # same path, new weights
    run = _run(tmp_path / "run", config)
    check = run.check("base")
    assert check.state is StageState.STALE
    assert check.reasons == (f"model.checkpoint ({tmp_path / 'ckpt'}) changed on disk since the stage ran",)
    assert "base checkpoint" in run.check("adapters").reasons[0] and "base checkpoint" in run.check("corpus").reasons[0]
    assert [c.stage for c in run.plan() if c.state is StageState.STALE] == list(STAGE_NAMES[1:])
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights v1")  # put back: complete again
    assert set(_states(_run(tmp_path / "run", config)).values()) == {StageState.COMPLETE}
    (tmp_path / "alpaca.json").write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    check = _run(tmp_path / "run", config).check("data")
    assert check.reasons == (f"data.source ({tmp_path / 'alpaca.json'}) changed on disk since the stage ran",)
    assert set(_states(_run(tmp_path / "run", config)).values()) == {StageState.STALE}


# ---- rollback ---------------------------------------------------------------------------------------


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rollback_waits_for_writers_still_running_after_the_failure(tmp_path):
    _run_all(_run(tmp_path, _config()), upto="corpus")
    before = _tree(tmp_path / "corpus")
    run = _run(tmp_path, _config())
    stage = run.begin("corpus", force=True)
    started = threading.Event()

    def late_writes():  # like tensorstore's I/O threads after one chunk write hit ENOSPC
        for i in range(20):
            (stage.path / "store").mkdir(exist_ok=True)
            (stage.path / "store" / f"chunk{i}").write_bytes(b"x" * 1000)
            started.set()
            time.sleep(0.03)

    writer = threading.Thread(target=late_writes)
    writer.start()
    started.wait()
    stage.abort(OSError(28, "No space left on device"))
    assert not writer.is_alive()  # the rollback waited for it
    writer.join()
    assert _tree(tmp_path / "corpus") == before and _leftovers(tmp_path) == []


def test_a_failed_rollback_keeps_the_previous_output_and_says_where(tmp_path, monkeypatch):
    _run_all(_run(tmp_path, _config()), upto="corpus")
    before = _tree(tmp_path / "corpus")
    stage = _run(tmp_path, _config()).begin("corpus", force=True)
    (stage.path / "partial.bin").write_bytes(b"half")
    real_replace = os.replace

    def failing(src, dst):
        if "previous" in str(src):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(RollbackError, match=r"stage 'corpus' failed \(disk full\), and putting its previous "
                       r"output back failed too .*; the previous output is kept at .*corpus\.tmp-previous-"):
        stage.abort(OSError("disk full"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(_leftovers(tmp_path)) == 2  # the previous output and the failed attempt, both under temp names
    (line, *_) = _run(tmp_path, _config()).resolve_leftovers()
    assert _tree(tmp_path / "corpus") == before and _leftovers(tmp_path) == []
    assert _run(tmp_path, _config()).check("corpus").state is StageState.COMPLETE
