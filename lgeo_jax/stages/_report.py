"""The `report` stage: `report.md`, `figures.csv` / `figures.json` and plots from the analysis stage's output."""

from __future__ import annotations

import json

import numpy as np

from lgeo_jax.config import StudyConfig
from lgeo_jax.manifest import Run, StageRun
from lgeo_jax.report import write_report
from lgeo_jax.stages._analysis import layer_arrays_path, results_path


def run_report(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Renders everything into this stage's directory (cheap: redone whole on resume)."""
    path = results_path(run)
    if not path.is_file():
        raise ValueError(f"{path} is missing; run the analysis stage to completion first")
    results = json.loads(path.read_text())
    arrays = {}
    for layer in results["meta"]["layers"]:
        with np.load(layer_arrays_path(run, layer), allow_pickle=False) as npz:
            arrays[layer] = {k: npz[k] for k in npz.files}
    title = config.report.title or f"lgeo report ({config.model.checkpoint})"
    files = write_report(results, arrays, stage.path, title=title, with_paper=config.report.paper_tables,
                         plots=config.report.plots, plot_format=config.report.plot_format.value)
    stage.update(files=files)
