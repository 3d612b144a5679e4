"""Writes the report directory: plots first, then CSV / JSON of every number, then `report.md` (atomically)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lgeo_jax.files import atomic_write_json, atomic_write_text
from lgeo_jax.report._config import ReportConfig
from lgeo_jax.report._crosscoder import crosscoder_rows
from lgeo_jax.report._figures import figure_rows, rows_to_csv
from lgeo_jax.report._markdown import render_markdown
from lgeo_jax.report._splice import splice_rows

REPORT_FILE = "report.md"
FIGURES_CSV = "figures.csv"
FIGURES_JSON = "figures.json"


def write_report(results: Mapping[str, Any], arrays: Mapping[int, Mapping[str, np.ndarray]], out_dir: str | Path,
                 config: ReportConfig, *, default_title: str = "lgeo report") -> list[str]:
    """Writes `report.md`, `figures.csv`, `figures.json` and (with `config.plots`) the figures; returns the file
    names. The title is `config.title`, else `default_title`.

    `results` is the analysis stage's `results.json`; `arrays` maps layer -> its raw arrays
    (`<adapter>/<comparison>/<max_cos|angles>`, `<adapter>/spectrum`, ...; `lgeo_jax.analysis.analyze_layer`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []
    if config.plots:
        from lgeo_jax.report._plots import write_plots  # matplotlib only when plotting

        plots = write_plots(results, arrays, out_dir, config.plot_format.value)
    rows = figure_rows(results) + crosscoder_rows(results) + splice_rows(results)
    atomic_write_text(out_dir / FIGURES_CSV, rows_to_csv(rows))
    atomic_write_json(out_dir / FIGURES_JSON, {"results": results, "rows": rows})
    atomic_write_text(out_dir / REPORT_FILE, render_markdown(results, title=config.title or default_title,
                                                             with_paper=config.paper_tables, plots=plots))
    return [*(name for name, _ in plots), FIGURES_CSV, FIGURES_JSON, REPORT_FILE]
