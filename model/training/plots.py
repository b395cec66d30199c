"""Figures that training and evaluation write to files: one backend, one way to save, the batch curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only: never a window, also on a machine without a display


def save_figure(fig: Figure, path: str | Path, dpi: int = 80) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_batches(ax: Axes, steps: list[int], values: list[float], color: str = "tab:blue") -> None:
    """Per-batch values, and their moving mean over about a fortieth of the run on top, the values then faint; a
    run too short for a mean (under 80 batches) shows its values alone, solid."""
    steps, values = np.asarray(steps), np.asarray(values)
    window = max(1, len(values) // 40)
    ax.plot(steps, values, alpha=0.25 if window > 1 else 1.0, color=color, label="train batch")
    if window > 1:
        ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), color=color,
                label=f"train, mean of {window}")
