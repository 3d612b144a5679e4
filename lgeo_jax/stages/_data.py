"""The `data` stage: the study's records (and, for the synthetic default, its tokenizer) in the run directory."""

from __future__ import annotations

import os

from lgeo_jax.config import BUILTIN_DATA, StudyConfig
from lgeo_jax.data import category_counts, load_alpaca, save_alpaca_json, write_synthetic_dataset
from lgeo_jax.manifest import Run, StageRun
from lgeo_jax.stages._inputs import records_path, split_config


def run_data(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Writes `records.json` (all records) and, for `builtin:synthetic`, `tokenizer/`; checks the splits fit."""
    splits = split_config(config)
    # Cheap and deterministic: an interrupted attempt is simply redone; only `finish` marks it complete.
    if config.data.source == BUILTIN_DATA:
        n = config.data.n_records or splits.required_records
        written = write_synthetic_dataset(stage.path, n_records=n, seed=config.data.synthetic_seed)
        os.replace(written.records_path, records_path(run))
    else:
        records = load_alpaca(config.data.source)
        save_alpaca_json(records, records_path(run))
    records = load_alpaca(records_path(run))
    if len(records) < splits.required_records:
        raise ValueError(f"data.source {config.data.source!r} has {len(records)} records, but the splits need "
                         f"{splits.required_records} (train {splits.train}, probe {splits.probe}, "
                         f"heldout {splits.heldout}); shrink the split ranges")
    probe = [records[i] for i in splits.indices("probe")]
    stage.update(n_records=len(records), probe_overlaps_train=splits.probe_overlaps_train,
                 probe_categories={c.value: n for c, n in category_counts(probe).items()})
