"""The `report` stage: `report.md`, `figures.csv` / `figures.json` and plots from the analysis stage's output."""

from __future__ import annotations

import json

import numpy as np

from lgeo_jax.files import read_json
from lgeo_jax.report import write_report
from lgeo_jax.stages._crosscoders import crosscoder_results_path
from lgeo_jax.stages._evaluate import evaluate_results_path
from lgeo_jax.stages._layout import layer_arrays_path, results_path
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.study import StudyConfig


def run_report(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Renders everything into this stage's directory (cheap: redone whole on resume)."""
    path = results_path(run)
    if not path.is_file():
        raise ValueError(f"{path} is missing; run the analysis stage to completion first")
    results = json.loads(path.read_text())
    results["crosscoder"] = read_json(crosscoder_results_path(run.stage_dir("crosscoders")), needed_by="the report")
    results["splice"] = read_json(evaluate_results_path(run.stage_dir("evaluate")), needed_by="the report")
    arrays = {}
    for layer in results["meta"]["layers"]:
        with np.load(layer_arrays_path(run, layer), allow_pickle=False) as npz:
            arrays[layer] = {k: npz[k] for k in npz.files}
    files = write_report(results, arrays, stage.path, config.report,
                         default_title=f"lgeo report ({config.model.checkpoint})")
    stage.update(files=files)
