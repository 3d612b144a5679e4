"""The `data` stage: the study's records (and, for the synthetic default, its tokenizer) in the run directory."""

from __future__ import annotations

import os

from lgeo_jax.data import category_counts, load_alpaca, save_alpaca_json, select_split, write_synthetic_dataset
from lgeo_jax.stages._layout import records_path
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig


def run_data(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Writes `records.json` (all records) and, for `builtin:synthetic`, `tokenizer/`; checks the splits fit."""
    data = config.data
    # Cheap and deterministic: an interrupted attempt is simply redone; only `finish` marks it complete.
    if data.is_synthetic:
        written = write_synthetic_dataset(stage.path, n_records=data.synthetic_records, seed=data.synthetic_seed)
        os.replace(written.records_path, records_path(run))
    else:
        records = load_alpaca(data.source, sha256=data.sha256)
        save_alpaca_json(records, records_path(run))
    records = load_alpaca(records_path(run))
    if len(records) < data.required_records:
        raise ValueError(f"data.source {data.source!r} has {len(records)} records, but the splits need "
                         f"{data.required_records} (train {data.train}, probe {data.probe}, "
                         f"heldout {data.heldout}); shrink the split ranges")
    probe = select_split(records, data, "probe")
    stage.update(n_records=len(records), probe_overlaps_train=data.probe_overlaps_train,
                 probe_categories={c.value: n for c, n in category_counts(probe).items()})
