"""Loss curves: one CSV row per optimizer step (a column per adapter) and a PNG plot."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from lgeo_jax.files import atomic_save_figure, atomic_write_text


def write_loss_csv(path: str | os.PathLike, names: Sequence[str], losses: np.ndarray,
                   lrs: Sequence[float] | None = None) -> None:
    """losses: [steps, n_adapters]; rows `step,<name>...[,lr]` with step counted from 1."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", *names] + (["lr"] if lrs is not None else []))
    for i, row in enumerate(np.asarray(losses)):
        writer.writerow([i + 1, *(f"{v:.6g}" for v in row)] + ([f"{lrs[i]:.6g}"] if lrs is not None else []))
    atomic_write_text(path, buf.getvalue())


def plot_losses(path: str | os.PathLike, names: Sequence[str], losses: np.ndarray, *, title: str) -> None:
    """Per-adapter training loss against step, with a moving average so trends read through the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(losses)
    steps = np.arange(1, losses.shape[0] + 1)
    window = max(1, losses.shape[0] // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        line, = ax.plot(steps, losses[:, i], alpha=0.25)
        smooth = np.convolve(losses[:, i], np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=line.get_color(), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (nats / target token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
