"""The project's figures, drawn with matplotlib: the confusion matrix of a classifier and the loss curves of runs.

Every figure is a `matplotlib.figure.Figure` rendered by its own `FigureCanvasAgg`, never through pyplot: pyplot
keeps global state (the current figure, a GUI backend picked from the environment), which is neither thread-safe
nor usable on a machine without a display, whereas a figure with its own Agg canvas is an ordinary object that any
thread or process can draw and throw away.

- `confusion_image` draws a confusion matrix (rows: true label, columns: predicted) as the (3, H, W) uint8 tensor
  TensorBoard's `add_image` takes; `confusion_markdown` gives the same counts as a table for the text tab, and
  `log_confusion` writes both.
- `save_runs_plot` writes the val/loss and train/loss curves of several runs, one colour per run, to a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

if TYPE_CHECKING:  # only for the annotation: drawing a figure needs no Lightning
    from lightning.pytorch.loggers import TensorBoardLogger

DPI = 100
RUN_COLORS: tuple[tuple[float, float, float], ...] = tuple(colormaps["tab10"].colors)  # run i: RUN_COLORS[i % 10]
MAX_ANNOTATED_CLASSES = 30  # beyond this the counts no longer fit in the cells: the text tab still has them

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values)


def render_rgb(fig: Figure) -> np.ndarray:
    """The figure's pixels as an (H, W, 3) uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]  # a copy: the buffer is reused by the next draw


# ------------------------------------------------------------------------------------------- confusion matrix


def _class_names(labels: Sequence[str] | None, n: int) -> list[str]:
    """The labels when there is one per class, else the class indices (a mismatch must not lose the matrix)."""
    if labels is not None and len(labels) == n:
        return [str(label) for label in labels]
    return [str(i) for i in range(n)]


def confusion_figure(matrix: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None) -> Figure:
    """The confusion matrix as a figure: a cell per (true, predicted) pair holding its count, shaded by the fraction
    of its row, green on the diagonal (right) and red off it (wrong), so that a row reads as "of the examples of
    this class, how many went where" whatever the class sizes."""
    counts = torch.as_tensor(matrix).detach().cpu().double().numpy()
    n = counts.shape[0]
    names = _class_names(labels, n)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    diagonal = np.eye(n, dtype=bool)

    side = float(np.clip(1.5 + 0.45 * n, 4.0, 14.0))  # inches: cells stay readable for a few classes or dozens
    side += min(0.07 * max(map(len, names), default=0), 3.0)  # room for long class names, which would squeeze the cells
    fig = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Two masked layers rather than one colormap: a single diverging map would tie the colour to the value, while
    # here the same fraction means "right" on the diagonal and "wrong" off it.
    shade = {"vmin": 0.0, "vmax": 1.0, "interpolation": "nearest", "aspect": "equal"}
    # Empty cells are masked in both, showing the white of the axes: the colormaps' lowest shade is a tint.
    ax.imshow(np.ma.masked_where(~diagonal | (frac == 0), frac), cmap="Greens", **shade)
    ax.imshow(np.ma.masked_where(diagonal | (frac == 0), frac), cmap="Reds", **shade)

    if n <= MAX_ANNOTATED_CLASSES:
        fontsize = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                dark = frac[i, j] > 0.55  # the colormaps get dark enough there that black text would vanish
                color = "white" if dark else "black"
                ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", fontsize=fontsize, color=color)

    ticks = np.arange(n)
    tick_size = 9 if n <= 15 else 6
    rotate = max(map(len, names), default=0) > 3  # long names side by side would overlap
    ax.set_xticks(
        ticks,
        names,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
        fontsize=tick_size,
    )
    ax.set_yticks(ticks, names, fontsize=tick_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("shade: fraction of the row", fontsize=10)
    # light lines between the cells: empty cells are as white as the background, and would merge without them
    ax.set_xticks(ticks[:-1] + 0.5, minor=True)
    ax.set_yticks(ticks[:-1] + 0.5, minor=True)
    ax.grid(which="minor", color="0.85", linewidth=1)
    ax.tick_params(which="minor", length=0)
    return fig


def confusion_image(matrix: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None) -> torch.Tensor:
    """`confusion_figure` rendered as an RGB image (3, H, W) uint8, the layout TensorBoard's `add_image` expects."""
    pixels = render_rgb(confusion_figure(matrix, labels))
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def confusion_markdown(matrix: torch.Tensor, labels: list[str]) -> str:
    """The counts as a markdown table (TensorBoard's text tab renders it), rows true, columns predicted."""
    rows = matrix.detach().cpu().long().tolist()
    head = "| true \\ predicted | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    return head + "\n".join(f"| {label} | " + " | ".join(map(str, r)) + " |" for label, r in zip(labels, rows))


def log_confusion(logger: TensorBoardLogger, tag: str, matrix: torch.Tensor, labels: list[str], step: int) -> None:
    """The matrix as an image and as a table under ``tag`` of a TensorBoardLogger (``logger.experiment`` is its
    SummaryWriter)."""
    logger.experiment.add_image(tag, confusion_image(matrix, labels), step)
    logger.experiment.add_text(tag, confusion_markdown(matrix, labels), step)


# ------------------------------------------------------------------------------------------- loss curves of runs


def _lighter(color: tuple[float, float, float], amount: float = 0.5) -> tuple[float, float, float]:
    """Mixed with white: train/loss in the run's hue but behind its val/loss, without transparency (overlapping
    translucent lines of several runs would blend into colours of no run)."""
    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(steps) & np.isfinite(values)  # a diverged run's inf/nan would wreck the axis limits
    return steps[keep], values[keep]


def runs_figure(curves: Sequence[Curves], names: Sequence[str], size: tuple[int, int] = (960, 540)) -> Figure:
    """val/loss (thick, a marker at each validation) and train/loss (thin, lighter) against the step, run i in
    ``RUN_COLORS[i % 10]``; the legend, right of the axes, names each colour ``names[i]``. ``size`` in pixels."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for i, run in enumerate(curves):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        if "train/loss" in run:
            x, y = _finite(*run["train/loss"])
            drawn |= len(x) > 0
            ax.plot(x, y, color=_lighter(color), linewidth=1.0, zorder=2)
        if "val/loss" in run:
            x, y = _finite(*run["val/loss"])
            drawn |= len(x) > 0
            ax.plot(x, y, color=color, linewidth=2.5, marker="o", markersize=4, zorder=3)
    if not drawn:
        ax.text(0.5, 0.5, "no train/loss or val/loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, color="0.9")

    grey = "0.35"
    handles = [
        Line2D([], [], color=grey, linewidth=2.5, marker="o", markersize=4, label="val/loss"),
        Line2D([], [], color=grey, linewidth=1.0, label="train/loss"),
        *(
            Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=4, label=name)
            for i, name in enumerate(names)
        ),
    ]
    per_column = max(1, (size[1] - 80) // 18 - 2)  # rows that fit the height: further runs go to more columns
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=8,
        frameon=False,
        ncols=1 + (len(handles) - 1) // per_column,
    )
    return fig


def save_runs_plot(curves: Sequence[Curves], names: Sequence[str], path: str | Path) -> Path:
    """`runs_figure` written as a PNG to ``path`` (its folder created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs_figure(curves, names).savefig(path, format="png")
    return path
