"""The study's pipeline: stages, their run directories and manifests, and the loop that runs them.

Typical use::

    config = lgeo_jax.study.load_config("configs/tiny.yaml", check_paths=True)
    run_stages(config, "corpus")          # data -> base -> adapters -> corpus, resuming what is unfinished
    for check in open_run(config).plan():
        print(check)                      # complete / resumable / stale (and why)
"""

from lgeo_jax.stages._corpus import corpus_size_bytes
from lgeo_jax.stages._layout import (
    adapter_dirs,
    base_checkpoint,
    base_sae_dir,
    corpus_store,
    delta_sae_dir,
    health_path,
    layer_arrays_path,
    load_records,
    load_tokenizer,
    records_path,
    results_path,
    sae_mesh,
    stage_devices,
    stage_mesh,
    sweep_path,
)
from lgeo_jax.stages._manifest import (
    MANIFEST_NAME,
    Manifest,
    RollbackError,
    Run,
    StageCheck,
    StageRun,
    StageSpec,
    StageState,
    Status,
)
from lgeo_jax.stages._peers import PeerFailed, Peers, job_peers
from lgeo_jax.stages._pipeline import (
    CONFIG_FILE,
    PIPELINE,
    STAGE_NAMES,
    Stage,
    StageOutcome,
    open_run,
    run_stages,
    upstream_of,
)
from lgeo_jax.stages._plan import (
    ResourceError,
    StageNeeds,
    check_resources,
    device_summary,
    plan_refusal,
    plan_text,
    stage_needs,
)

__all__ = [
    "CONFIG_FILE", "MANIFEST_NAME", "Manifest", "PIPELINE", "PeerFailed", "Peers", "ResourceError", "RollbackError",
    "Run", "STAGE_NAMES", "Stage", "StageCheck", "StageNeeds", "StageOutcome", "StageRun", "StageSpec", "StageState",
    "Status", "adapter_dirs", "base_checkpoint", "base_sae_dir", "check_resources", "corpus_size_bytes",
    "corpus_store", "delta_sae_dir", "device_summary", "health_path", "job_peers", "layer_arrays_path",
    "load_records", "load_tokenizer", "open_run", "plan_refusal", "plan_text", "records_path", "results_path",
    "run_stages", "sae_mesh", "stage_devices", "stage_mesh", "stage_needs", "sweep_path", "upstream_of",
]
