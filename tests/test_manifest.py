"""Stage manifests: staleness names downstream stages, failed reruns restore, resume works."""

import json

import pytest

from lgeo_jax.files import is_temporary
from lgeo_jax.stages import MANIFEST_NAME, PIPELINE, Manifest, Run, Stage, StageState
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
    assert check.invalidated == ("corpus", "saes", "analysis", "report")
    assert str(check) == ("adapters: stale (config section 'lora' changed); invalidates corpus, saes, analysis, report")
    states = _states(run)
    assert [s for s, v in states.items() if v is StageState.STALE] == [
        "adapters",
        "corpus",
        "saes",
        "analysis",
        "report",
    ]
    assert states["data"] is states["base"] is StageState.COMPLETE
    assert run.plan()[3].reasons == ("input 'adapters' will rerun",)


def test_data_change_invalidates_everything_and_other_sections_nothing_upstream(tmp_path):
    _run_all(_run(tmp_path, _config()))
    assert set(_states(_run(tmp_path, _config("data.max_length=64"))).values()) == {StageState.STALE}
    states = _states(_run(tmp_path, _config("sae.l1=0.3")))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["saes", "analysis", "report"]


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
    assert check.invalidated == ("analysis", "report")


def test_force_in_plan_marks_downstream(tmp_path):
    run = _run(tmp_path, _config())
    _run_all(run)
    states = _states(run, force=("saes",))
    assert [s for s, v in states.items() if v is StageState.STALE] == ["saes", "analysis", "report"]
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
    assert [s.name for s in PIPELINE] == ["data", "base", "adapters", "corpus", "saes", "analysis", "report"]
