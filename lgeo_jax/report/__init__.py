"""The study's report: `report.md` (the SAEs' training health, Tables 2 and 4-12, each number with its interval,
beside its nulls and the paper's value, verdicts against the nulls), `figures.csv` / `figures.json` with every
number, and captioned plots (matplotlib, Agg backend).

Typical use (the `report` stage does this)::

    names = write_report(results, arrays_by_layer, out_dir, ReportConfig(title="lgeo tiny"))
"""

from lgeo_jax.report._config import PlotFormat, ReportConfig
from lgeo_jax.report._figures import figure_rows, flatten, paper_value, rows_to_csv
from lgeo_jax.report._markdown import render_markdown
from lgeo_jax.report._write import FIGURES_CSV, FIGURES_JSON, REPORT_FILE, write_report

__all__ = ["FIGURES_CSV", "FIGURES_JSON", "REPORT_FILE", "PlotFormat", "ReportConfig", "figure_rows", "flatten",
           "paper_value", "render_markdown", "rows_to_csv", "write_report"]
