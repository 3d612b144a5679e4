"""The `report` section: title, whether the paper's numbers stand beside ours, plots and their format."""

from __future__ import annotations

import enum

from lgeo_jax.config import Section, field, section


class PlotFormat(enum.Enum):
    PNG = "png"
    SVG = "svg"
    PDF = "pdf"


@section
class ReportConfig(Section):
    """Tables 4-12 and plots, side by side with the paper's numbers when `paper_tables`."""

    title: str | None = field(None)  # None: "lgeo report (<checkpoint>)"
    paper_tables: bool = field(True)
    plots: bool = field(True)
    plot_format: PlotFormat = field(PlotFormat.PNG)
