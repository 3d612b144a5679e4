"""Training metrics on disk: one CSV row per (step, SAE), and a PNG of the curves drawn from that CSV."""

from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Sequence

from lgeo_jax.files import atomic_save_figure, atomic_write_text

COLUMNS = ("step", "sae", "name", "l1_coeff", "loss", "mse", "penalty", "l1", "l0", "fvu", "dead_frac",
           "heldout_rel_l2", "heldout_rel_l2_pooled", "heldout_fvu", "heldout_l0", "tokens_per_s")


class MetricsCSV:
    """A CSV that grows by rows, rewritten atomically on every append (a kill never leaves half a row); on
    resume, rows logged after the restored step are dropped so the log stays exact."""

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        self._text = io.StringIO()
        writer = csv.DictWriter(self._text, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        if resume_step is not None and path.exists():
            with path.open() as fh:
                writer.writerows(r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step)
        atomic_write_text(self.path, self._text.getvalue())

    def append(self, rows: Sequence[dict]) -> None:
        csv.DictWriter(self._text, COLUMNS, extrasaction="ignore").writerows(rows)
        atomic_write_text(self.path, self._text.getvalue())


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The CSV as dicts with numbers parsed (empty cells, e.g. held-out columns between evals, become None)."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (v if k == "name" else (float(v) if v else None)) for k, v in r.items()} for r in rows]


def plot_metrics(csv_path: pathlib.Path, png_path: pathlib.Path) -> None:
    """Loss, L0, FVU, dead fraction and held-out FVU against step, one line per SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    names = sorted({r["name"] for r in rows}, key=lambda n: next(r["sae"] for r in rows if r["name"] == n))
    panels = ("loss", "l0", "fvu", "dead_frac", "heldout_fvu")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, key in zip(axes, panels, strict=True):
        for name in names:
            pts = [(r["step"], r[key]) for r in rows if r["name"] == name and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("loss", "fvu", "heldout_fvu"):
            ax.set_yscale("log")
    if len(names) <= 12:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    atomic_save_figure(fig, png_path, dpi=100)
    plt.close(fig)
