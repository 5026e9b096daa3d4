"""Attention maps in TensorBoard: at every validation, one image per layer of the attention weights on one prompt.

Tags ``attention/layer_<i>`` (TensorBoard's Images tab, a slider over the steps): the heads of layer i in a grid,
each a T x T map whose row is a query token and whose columns are the tokens it attends to, both axes labelled
with the prompt's tokens (datamodules.tokenizer.token_labels). The weights are computed explicitly on that one prompt
(llm/core/attention_maps.py: the model's own q and k, LoRA adapters, QK-norm and RoPE included); training keeps
the fused SDPA kernel.

The prompt is the ``samples`` callback's first (``conf/callbacks/default.yaml`` interpolates it), else this
callback's default. Cost, once per validation: one forward of the prompt and, per layer, one image (the figure's
labels are drawn once per run, see HeadGrid); bench/attention.py measures it against a run without the callback.
Every rank runs the forward (FSDP gathers weights in it); rank 0 draws and writes.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.tokenizer import token_labels
from llm.core.attention_maps import capture
from llm.errors import UserError

DEFAULT_PROMPT = "It is a truth universally acknowledged"  # the samples callback's first default prompt


class HeadGrid:
    """The image of one layer: its H heads in a grid of at most 4 columns, each a T x T map (rows: the query token,
    columns: the key token it attends to; colour 0 to 1), both axes labelled with the prompt's tokens.

    Drawn with matplotlib's Agg canvas (no pyplot: no global figure state, no display). Everything but the maps
    and the title is the same for every layer and validation, so it is drawn once and kept as a background that
    each image starts from (matplotlib's blitting): then an image costs ~6 ms instead of ~150 ms for a full draw of
    its tick labels (8 heads, 9 tokens, 2 CPU cores), with the same pixels.
    """

    def __init__(self, n_heads: int, labels: list[str]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.n_heads, self.labels, T = n_heads, list(labels), len(labels)
        self.cols = min(n_heads, 4)
        rows = math.ceil(n_heads / self.cols)
        self.pitch = T + 2  # a map and the gap after it, in cells
        self.grid = np.full((rows * self.pitch - 2, self.cols * self.pitch - 2), np.nan, dtype=np.float32)
        cell = 0.11  # inches per token: rows of 6-point labels
        margin = 0.065 * max(len(t) for t in labels) + 0.15  # inches for the longest tick label
        width, height = self.grid.shape[1] * cell, self.grid.shape[0] * cell
        fig = Figure(figsize=(width + margin + 0.15, height + margin + 0.4), dpi=100)
        FigureCanvasAgg(fig)
        fig_w, fig_h = fig.get_size_inches()
        ax = fig.add_axes((margin / fig_w, margin / fig_h, width / fig_w, height / fig_h))
        self.image = ax.imshow(self.grid, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", aspect="auto")
        ticks = [c * self.pitch + j for c in range(self.cols) for j in range(T)]
        ax.set_xticks(ticks, self.labels * self.cols, rotation=90, fontsize=6)
        ax.set_yticks([r * self.pitch + j for r in range(rows) for j in range(T)], self.labels * rows, fontsize=6)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        for h in range(n_heads):
            r, c = divmod(h, self.cols)
            ax.text(
                c * self.pitch + T / 2 - 0.5, r * self.pitch - 0.7, f"head {h}", ha="center", va="bottom", fontsize=7
            )
        self.title = fig.suptitle("", fontsize=8, y=1 - 0.05 / fig_h, va="top")
        self.fig = fig
        fig.canvas.draw()  # the background: labels, head titles, no maps (the grid is all NaN: transparent)
        self.background = fig.canvas.copy_from_bbox(fig.bbox)

    def __call__(self, weights: torch.Tensor, title: str) -> np.ndarray:
        """weights (H, T, T) -> RGB image (height, width, 3) uint8."""
        T = len(self.labels)
        for h in range(self.n_heads):
            r, c = divmod(h, self.cols)
            self.grid[r * self.pitch : r * self.pitch + T, c * self.pitch : c * self.pitch + T] = weights[h].numpy()
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.image.set_data(self.grid)
        self.title.set_text(title)
        self.image.axes.draw_artist(self.image)
        self.fig.draw_artist(self.title)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class AttentionMaps(L.Callback):
    """After each validation, log the attention weights of every layer on ``prompt`` (see the module docstring).

    Args:
        prompt: the text; None for the default (a null ``samples`` callback makes the interpolation null).
        max_tokens: keep the prompt's first this many tokens (BOS included): each map is T x T.
    """

    def __init__(self, prompt: str | None = None, max_tokens: int = 32) -> None:
        if int(max_tokens) < 1:
            raise UserError(f"callbacks.attention.max_tokens must be >= 1, got {max_tokens}")
        self.prompt = DEFAULT_PROMPT if prompt is None else str(prompt)
        self.max_tokens = int(max_tokens)
        self._logged_step: int | None = None
        self._grid: HeadGrid | None = None

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if trainer.sanity_checking or trainer.datamodule is None or model is None:
            return
        step = trainer.global_step
        if step == self._logged_step:  # the final validation of the best checkpoint, at a step already shown
            return
        tokenizer = trainer.datamodule.tokenizer
        # with BOS, as the samples callback encodes; at most the model's context
        ids = tokenizer.encode(self.prompt).ids[: min(self.max_tokens, model.cfg.max_seq_len)]
        if not ids:
            return
        tokens = torch.tensor([ids], device=pl_module.device)
        maps = capture(model, tokens)  # every rank: under FSDP the forward gathers each block's weights
        self._logged_step = step
        if not trainer.is_global_zero or not maps:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        labels = token_labels(tokenizer, ids)
        n_heads = maps[0].shape[0]
        if self._grid is None or self._grid.labels != labels or self._grid.n_heads != n_heads:
            self._grid = HeadGrid(n_heads, labels)  # once per run: the prompt and the heads stay the same
        for i, weights in enumerate(maps):
            image = self._grid(weights, f"layer {i} at step {step}: {self.prompt[:60]!r}")
            for logger in loggers:
                logger.experiment.add_image(f"attention/layer_{i}", image, step, dataformats="HWC")
