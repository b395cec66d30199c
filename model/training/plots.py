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


def plot_fit(history: dict, path: str | Path, loss: tuple[str, str, str], accuracy: tuple[str, str]) -> None:
    """A fit on cached inputs: train and validation loss at each validation (`history`'s "step", "loss",
    "val_loss"), and the validation accuracy of each group in `history["val"]` ({group: accuracy} per validation,
    "all" drawn thick). `loss`: (its train line's label, y label, title); `accuracy`: (y label, title)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    train_label, loss_label, loss_title = loss
    ax_loss.plot(history["step"], history["loss"], label=train_label)
    ax_loss.plot(history["step"], history["val_loss"], label="val")
    ax_loss.set(xlabel="step", ylabel=loss_label, yscale="log", title=loss_title)
    ax_loss.legend()
    for group in history["val"][0]:
        ax_acc.plot(history["step"], [v[group] for v in history["val"]], label=group,
                    lw=2.5 if group == "all" else 1.2)
    ax_acc.set(xlabel="step", ylabel=accuracy[0], ylim=(0, 1.02), title=accuracy[1])
    ax_acc.legend(fontsize=8)
    save_figure(fig, path)
