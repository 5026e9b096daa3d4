"""The figures of llm/training/plots.py: the confusion matrix (image, table, TensorBoard) and the runs' loss curves."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llm.training.plots import (
    RUN_COLORS,
    confusion_figure,
    confusion_image,
    confusion_markdown,
    log_confusion,
    render_rgb,
    runs_figure,
    save_runs_plot,
)

LABELS = ["neg", "pos", "zzz"]
MATRIX = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 2]])  # row 1 empty; 3/4 of row 0 right, 2/4 of row 2 wrong

# ------------------------------------------------------------------------------------------- confusion matrix


def cell_colors(matrix: torch.Tensor, labels=LABELS) -> tuple[np.ndarray, Callable[[int, int], np.ndarray]]:
    """The rendered figure and a function giving the RGB of cell (row i, column j), sampled near its corner where
    the count's text is not."""
    fig = confusion_figure(matrix, labels)
    pixels = render_rgb(fig)
    ax = fig.axes[0]

    def color(i: int, j: int) -> np.ndarray:
        x, y = ax.transData.transform((j - 0.35, i - 0.35))  # display pixels from the bottom-left corner
        return pixels[pixels.shape[0] - int(round(y)), int(round(x))].astype(int)

    return pixels, color


def test_confusion_image_is_an_rgb_uint8_tensor():
    img = confusion_image(MATRIX, LABELS)
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert img.shape[1] >= 200 and img.shape[2] >= 200  # a readable image, not a few pixels
    assert img.is_contiguous()
    assert len(torch.unique(img.reshape(3, -1), dim=1).T) > 10  # drawn, not a blank page


def test_confusion_cells_are_shaded_by_the_fraction_of_their_row():
    _, color = cell_colors(MATRIX)
    assert color(1, 1).tolist() == [255, 255, 255]  # an empty row stays white
    assert color(0, 2).tolist() == [255, 255, 255]  # an empty cell too
    g, r = color(0, 0), color(2, 0)  # 3/4 right (green), 2/4 wrong (red)
    assert g[1] > g[0] and g[1] > g[2] and r[0] > r[1] and r[0] > r[2]
    light_green = color(2, 2)  # 2/4 right: greener than white, lighter than 3/4
    assert light_green[1] > light_green[0] and light_green.sum() > g.sum()


def test_a_diagonal_matrix_is_green_on_the_diagonal_and_white_off_it():
    diagonal = torch.diag(torch.tensor([5, 7, 9]))
    _, color = cell_colors(diagonal)
    on, off = color(1, 1), color(1, 0)
    assert off.tolist() == [255, 255, 255]
    assert on.sum() < off.sum() - 200 and on[1] > on[0] and on[1] > on[2]  # darker, and green
    swapped = diagonal[[1, 2, 0]]  # every example predicted as another class
    assert not torch.equal(confusion_image(diagonal, LABELS), confusion_image(swapped, LABELS))
    _, color = cell_colors(swapped)
    wrong = color(0, 1)
    assert wrong[0] > wrong[1] and wrong[0] > wrong[2] and color(0, 0).tolist() == [255, 255, 255]


def test_confusion_figure_is_labelled_with_counts_and_class_names():
    fig = confusion_figure(MATRIX, LABELS)
    render_rgb(fig)  # tick labels get their text when drawn
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(i, j): str(int(MATRIX[i, j])) for i in range(3) for j in range(3)}  # (row, column) -> count


def test_confusion_figure_without_matching_labels_uses_the_class_indices():
    fig = confusion_figure(np.eye(4, dtype=np.int64), labels=["a", "b"])
    render_rgb(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_confusion_of_many_classes_drops_the_counts_but_still_draws():
    n = 40
    fig = confusion_figure(torch.eye(n, dtype=torch.long) * 3)
    assert len(fig.axes[0].texts) == 0
    assert confusion_image(torch.eye(n, dtype=torch.long)).shape[0] == 3


def test_confusion_images_drawn_in_threads_are_the_same():
    """No pyplot state is shared: figures drawn concurrently come out as when drawn alone."""
    alone = confusion_image(MATRIX, LABELS)
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: confusion_image(MATRIX, LABELS), range(4)))
    assert all(torch.equal(img, alone) for img in images)


def test_confusion_markdown_and_log_confusion(tmp_path):
    table = confusion_markdown(MATRIX, LABELS)
    assert table.splitlines()[0] == "| true \\ predicted | neg | pos | zzz |"
    assert "| zzz | 2 | 0 | 2 |" in table
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    log_confusion(logger, "val/confusion", MATRIX, LABELS, 3)
    logger.finalize("success")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    (image,) = acc.Images("val/confusion")
    assert image.step == 3 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    img = confusion_image(MATRIX, LABELS)
    assert (image.height, image.width) == tuple(img.shape[1:])
    (text,) = acc.Tensors("val/confusion/text_summary")
    assert b"| zzz | 2 | 0 | 2 |" in text.tensor_proto.string_val[0]


# ------------------------------------------------------------------------------------------- loss curves of runs


def near(pixels: np.ndarray, color, tolerance: float = 0.06) -> np.ndarray:
    """Pixels within ``tolerance`` (per channel, 0..1) of ``color``."""
    return (np.abs(pixels[..., :3] - np.asarray(color)) <= tolerance).all(axis=-1)


def decreasing(start: float, n: int = 50) -> dict:
    steps = np.arange(n, dtype=np.float64)
    train = start * np.exp(-steps / 20) + 1
    return {"train/loss": (steps, train), "val/loss": (steps[::10], train[::10] + 0.1)}


def test_runs_plot_is_a_png_with_a_colour_per_run(tmp_path):
    path = save_runs_plot([decreasing(8), decreasing(6), decreasing(4)], ["#0 a", "#1 b", "#2 c"], tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)  # floats in 0..1, (H, W, 3 or 4)
    assert pixels.shape[:2] == (540, 960)
    assert pixels[..., :3].std() > 0.05  # not blank
    for color in RUN_COLORS[:3]:  # each run's val/loss (thick) in its colour, and the legend's sample
        assert near(pixels, color).sum() > 300, color
    assert near(pixels, RUN_COLORS[3]).sum() < 20  # no fourth run, no fourth colour


def test_runs_figure_draws_val_thick_over_train_thin_and_names_the_runs():
    fig = runs_figure([decreasing(8), {"train/loss": decreasing(5)["train/loss"]}], ["#0 a", "#1 b"])
    ax = fig.axes[0]
    widths = sorted((line.get_linewidth(), line.get_marker()) for line in ax.lines)
    assert [w for w, _ in widths] == [1.0, 1.0, 2.5]  # two train/loss curves, one val/loss
    val = max(ax.lines, key=lambda line: line.get_linewidth())
    assert val.get_marker() == "o" and val.get_color() == RUN_COLORS[0]
    assert val.get_zorder() > min(line.get_zorder() for line in ax.lines)  # drawn on top of the thin lines
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["val/loss", "train/loss", "#0 a", "#1 b"]
    assert ax.get_xlabel() == "step"


def test_runs_figure_skips_non_finite_points():
    steps = np.array([0.0, 1.0, 2.0, 3.0])
    fig = runs_figure([{"train/loss": (steps, np.array([5.0, np.inf, np.nan, 4.0]))}], ["#0"])
    (line,) = fig.axes[0].lines
    assert line.get_xdata().tolist() == [0.0, 3.0]
    render_rgb(fig)
    assert fig.axes[0].get_ylim()[1] < 10  # the axis fits the finite values


@pytest.mark.parametrize("curves", [[], [{}], [{"val/loss": (np.array([1.0]), np.array([np.nan]))}]])
def test_runs_plot_without_data_is_still_a_png(tmp_path, curves):
    path = save_runs_plot(curves, ["#0"] * len(curves), tmp_path / "deep" / "runs.png")
    assert matplotlib.image.imread(path).shape[:2] == (540, 960)


def test_many_runs_get_legend_columns_and_cycle_the_colours():
    n = 40
    fig = runs_figure([decreasing(1 + i / 10) for i in range(n)], [f"#{i}" for i in range(n)])
    render_rgb(fig)
    assert fig.axes[0].lines[2 * 10 + 1].get_color() == RUN_COLORS[0]  # run 10's val/loss in run 0's colour
    legend = fig.legends[0]
    assert len(legend.get_texts()) == n + 2
    box = legend.get_window_extent()
    assert box.y0 >= 0 and box.y1 <= fig.bbox.height and box.width > 0  # in more columns, not off the page
