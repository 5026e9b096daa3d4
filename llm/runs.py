"""Compare runs: `python -m llm.runs DIR [DIR ...]` prints a table of the runs and plots their loss curves to a PNG.

A run is a directory holding `.hydra/config.yaml` (train.py writes one per run, and one per job of a `-m` sweep);
each DIR is a run, or a folder searched recursively for runs. The table has one row per run:
- the settings that differ between the runs: the keys overridden on the command line (`.hydra/overrides.yaml`;
  a group such as `model=small` shows the chosen option) and any other key of the saved configs that differs;
- the final val/loss, the median tokens/s, the wall time and the number of optimizer steps;
- the status: `ok`, `stopped` (by a signal) or `failed: <first line of the error>` from `status.json`, which
  train.py writes when a run ends; without it `running` (a file of the run changed less than RUNNING_WINDOW_S
  ago) or `unknown`.
Numbers come from status.json when it has them, else from the TensorBoard event files of the run.

The plot (default `runs.png` in the common parent of the runs; `--plot PATH`, `--no-plot`) draws val/loss (thick,
with a marker at each validation) and train/loss (thin, lighter) against the step, one colour per run; the legend
gives each colour the run's number in the table. It is drawn with numpy and encoded with zlib (`Canvas`,
`png_bytes`), so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.errors import UserError

RUNNING_WINDOW_S = 300  # a run without status.json whose files changed this recently is still running
MAX_DIFF_COLUMNS = 8  # more differing keys are listed under the table
PLOT_TAGS = ("val/loss", "train/loss")

# --------------------------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """What the summary knows about one run directory."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as typed (`+`/`++`/`~` stripped)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> chosen option (model -> tiny)
    config: dict[str, str] = field(default_factory=dict)  # flattened saved config: dotted key -> value as text
    status: str = "unknown"  # ok | stopped | failed | running | unknown
    error: str | None = None  # first line of the error of a failed run
    val_loss: float | None = None
    tokens_per_sec: float | None = None
    wall_s: float | None = None
    steps: int | None = None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tag -> (steps, values)

    @property
    def status_text(self) -> str:
        return f"failed: {self.error}" if self.status == "failed" and self.error else self.status


def _natural_key(path: Path) -> list:
    """Sort job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory (one holding `.hydra/config.yaml`) among ``paths`` and below them."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        for config in [path / ".hydra" / "config.yaml", *path.rglob(".hydra/config.yaml")]:
            if config.is_file():
                run = config.parent.parent
                found.setdefault(run.resolve(), run)
    return sorted(found.values(), key=_natural_key)


def _text(value: Any) -> str:
    """A config value as the table shows it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists stay one value."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): _text(node)}
    out: dict[str, str] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Hydra's override strings (`optim.lr=1e-3`, `+hparams_search=optuna`, `~callbacks.samples`) as a dict."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value if _ else "(deleted)"
    return out


def _load_yaml(path: Path) -> Any:
    """A saved Hydra file as plain containers, interpolations left as written; None when missing or unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):
        return None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, wall time, value)] in the order written, from every TensorBoard event file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "tensors": 1, "images": 1, "histograms": 1, "audio": 1, "compressedHistograms": 1}
    logdirs = sorted({f.parent for f in run_dir.rglob("events.out.tfevents.*") if f.is_file()})
    scalars: dict[str, list[tuple[int, float, float]]] = {}
    for logdir in logdirs:
        acc = EventAccumulator(str(logdir), size_guidance=guidance)
        try:
            acc.Reload()
        except Exception:  # a truncated file of a killed run: keep what the other files hold
            continue
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    for events in scalars.values():
        events.sort(key=lambda e: e[1])  # by wall time (stable): the order written, also across directories
    return scalars


def curve(events: list[tuple[int, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) sorted by step; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for step, _, value in events:
        by_step[step] = value
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_run(path: Path, now: float | None = None) -> Run:
    """Read one run directory: its configuration, status.json and TensorBoard scalars."""
    path = Path(path)
    run = Run(path=path)
    run.overrides = parse_overrides(_load_yaml(path / ".hydra" / "overrides.yaml") or [])
    hydra_cfg = _load_yaml(path / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    run.choices = {k: _text(v) for k, v in choices.items() if not k.startswith("hydra/")}
    config = _load_yaml(path / ".hydra" / "config.yaml")
    run.config = flatten(config) if isinstance(config, dict) else {}

    scalars = read_scalars(path)
    run.curves = {tag: curve(scalars[tag]) for tag in PLOT_TAGS if tag in scalars}
    if scalars.get("val/loss"):
        run.val_loss = _finite(scalars["val/loss"][-1][2])  # the last written: the final validation
    if scalars.get("perf/tokens_per_sec"):
        run.tokens_per_sec = float(np.median([v for _, _, v in scalars["perf/tokens_per_sec"]]))
    if scalars.get("train/loss"):
        run.steps = max(s for s, _, _ in scalars["train/loss"]) + 1  # Lightning logs step k's loss at k - 1
    times = [w for events in scalars.values() for _, w, _ in events]
    if times:
        run.wall_s = max(times) - min(times)

    status = _load_json(path / "status.json")
    if isinstance(status, dict) and status.get("status"):
        run.status = str(status["status"])
        error = str(status.get("error") or "").strip()
        run.error = error.splitlines()[0] if error else None
        run.val_loss = _finite(status.get("val_loss")) if "val_loss" in status else run.val_loss
        run.wall_s = _finite(status.get("wall_s")) or run.wall_s
    else:
        newest = max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0.0)
        run.status = "running" if (now or time.time()) - newest < RUNNING_WINDOW_S else "unknown"
    return run


# --------------------------------------------------------------------------------------------- the table


def value_of(run: Run, key: str) -> str:
    """The run's setting ``key``: a group's chosen option, else the saved config's value, else as typed."""
    if key in run.choices:
        return run.choices[key]
    if key in run.config:
        return run.config[key]
    return run.overrides.get(key, "-")


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Keys whose values differ between the runs: overridden ones first, then others of the saved configs that
    no differing override explains (`model.dim` is explained by `model=small`)."""
    if len(runs) < 2:
        return []
    keys: list[str] = []
    for key in dict.fromkeys(k for run in runs for k in run.overrides):
        if len({value_of(run, key) for run in runs}) > 1:
            keys.append(key)
    for key in dict.fromkeys(k for run in runs for k in run.config):
        if any(key == k or key.startswith(k + ".") for k in keys):
            continue
        if len({run.config.get(key, "-") for run in runs}) > 1:
            keys.append(key)
    return keys


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(runs: Sequence[Run], labels: Sequence[str]) -> str:
    """The runs as an aligned text table (see the module docstring), numbered as in the plot's legend."""
    keys = differing_keys(runs)
    shown, hidden = keys[:MAX_DIFF_COLUMNS], keys[MAX_DIFF_COLUMNS:]
    header = ["#", "run", *shown, "val/loss", "tok/s", "wall", "steps", "status"]
    rows = [
        [
            str(i),
            label,
            *(value_of(run, k) for k in shown),
            _number(run.val_loss, ".4f"),
            _number(run.tokens_per_sec, ",.0f"),
            _duration(run.wall_s),
            "-" if run.steps is None else str(run.steps),
            run.status_text,
        ]
        for i, (run, label) in enumerate(zip(runs, labels))
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    numeric = {0, *range(len(header) - 5, len(header) - 1)}  # right-aligned columns

    def line(row: list[str]) -> str:
        cells = [cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    lines = [line(header), *(line(row) for row in rows)]
    if hidden:
        lines.append(f"(also differ: {', '.join(hidden)})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- PNG drawing

PALETTE = [  # distinct on white; run i gets PALETTE[i % len(PALETTE)]
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]

# A 3x5 pixel font: each glyph is 5 rows of 3 pixels, "#" on. Enough for tick labels and the legend.
_GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", "..#", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."],
    "-": ["...", "...", "###", "...", "..."],
    "+": ["...", ".#.", "###", ".#.", "..."],
    "/": ["..#", "..#", ".#.", "#..", "#.."],
    "a": ["...", ".##", "#.#", "#.#", ".##"],
    "e": ["...", ".##", "###", "#..", ".##"],
    "i": [".#.", "...", ".#.", ".#.", ".#."],
    "l": ["##.", ".#.", ".#.", ".#.", "###"],
    "n": ["...", "##.", "#.#", "#.#", "#.#"],
    "o": ["...", ".#.", "#.#", "#.#", ".#."],
    "p": ["...", "##.", "#.#", "##.", "#.."],
    "r": ["...", "#.#", "##.", "#..", "#.."],
    "s": ["...", ".##", ".#.", "..#", "##."],
    "t": [".#.", "###", ".#.", ".#.", ".##"],
    "v": ["...", "#.#", "#.#", "#.#", ".#."],
    " ": ["...", "...", "...", "...", "..."],
}
_FONT = {c: np.array([[p == "#" for p in row] for row in rows]) for c, rows in _GLYPHS.items()}


class Canvas:
    """An RGB image, ``pixels`` (H, W, 3) uint8, with what a line plot needs: rectangles, thick polylines, text.

    Coordinates are pixels, x to the right and y downwards from the top-left corner; drawing is clipped to the
    image (and, for lines, to an optional box).
    """

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        """Fill the pixels x0 <= x <= x1, y0 <= y <= y1."""
        x0, x1 = max(0, min(x0, x1)), min(self.width - 1, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height - 1, max(y0, y1))
        if x0 <= x1 and y0 <= y1:
            self.pixels[y0 : y1 + 1, x0 : x1 + 1] = color

    def points(self, xs: np.ndarray, ys: np.ndarray, color: tuple[int, int, int], size: int = 1, box=None) -> None:
        """A square of ``size`` pixels centred on each (x, y), clipped to ``box`` = (x0, y0, x1, y1) if given."""
        x0, y0, x1, y1 = box or (0, 0, self.width - 1, self.height - 1)
        xs, ys = np.rint(np.asarray(xs, dtype=np.float64)), np.rint(np.asarray(ys, dtype=np.float64))
        lo = -(size // 2)
        for dx in range(lo, lo + size):
            for dy in range(lo, lo + size):
                x, y = xs + dx, ys + dy
                keep = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
                self.pixels[y[keep].astype(int), x[keep].astype(int)] = color

    def polyline(self, xs: np.ndarray, ys: np.ndarray, color: tuple[int, int, int], width: int = 1, box=None) -> None:
        """Straight segments through the points (xs[i], ys[i]), ``width`` pixels thick."""
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if len(xs) == 0:
            return
        if len(xs) == 1:
            self.points(xs, ys, color, width, box)
            return
        dx, dy = np.diff(xs), np.diff(ys)
        n = np.maximum(1, np.ceil(np.maximum(np.abs(dx), np.abs(dy)))).astype(np.int64)  # samples per segment
        segment = np.repeat(np.arange(len(n)), n)
        t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)  # 0 <= t < 1 in each segment
        px = np.append(xs[:-1][segment] + t * dx[segment], xs[-1])
        py = np.append(ys[:-1][segment] + t * dy[segment], ys[-1])
        self.points(px, py, color, width, box)

    def text(self, x: int, y: int, s: str, color: tuple[int, int, int] = (0, 0, 0), scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y) in the 3x5 font; returns the x after the last glyph.
        Characters without a glyph are drawn as spaces."""
        for ch in s:
            glyph = _FONT.get(ch, _FONT.get(ch.lower(), _FONT[" "]))
            ys, xs = np.nonzero(np.kron(glyph, np.ones((scale, scale), dtype=bool)))
            keep = (x + xs < self.width) & (y + ys < self.height) & (x + xs >= 0) & (y + ys >= 0)
            self.pixels[y + ys[keep], x + xs[keep]] = color
            x += 4 * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return max(0, 4 * scale * len(s) - scale)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file of an (H, W, 3) uint8 RGB image: signature, IHDR, one zlib-compressed IDAT, IEND."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 8 bits per sample, colour type 2 (RGB), deflate, adaptive filtering, no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * 3)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))  # filter 0 (None) before each row
        + chunk(b"IEND", b"")
    )


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) within [lo, hi], at most ``target`` + 1 of them."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick spacing ``step`` needs (0.25 -> 2, 0.5 -> 1, 1000 -> 0)."""
    decimals = next((d for d in range(10) if abs(round(step, d) - step) <= 1e-9 * abs(step)), 10)
    return f"{value:.{decimals}f}"


@dataclass
class Series:
    """One line of a plot, in data coordinates."""

    x: np.ndarray
    y: np.ndarray
    color: tuple[int, int, int]
    width: int = 1
    markers: bool = False  # a square at each point


def line_plot(
    series: Sequence[Series],
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    styles: Sequence[tuple[str, int]] = (),
    size: tuple[int, int] = (960, 540),
) -> np.ndarray:
    """Draw the series on axes with ticks and a grid; ``legend``: (label, colour) squares, ``styles``: (label,
    line width) samples, both listed right of the axes. Returns the (H, W, 3) image."""
    width, height = size
    per_column = max(1, (height - 60 - 22 * len(styles)) // 18)
    columns = max(1, math.ceil(len(legend) / per_column))
    left, top, bottom = 70, 20, height - 40
    right = width - 20 - max(130, 70 * columns)
    canvas = Canvas(width, height)
    box = (left, top, right, bottom)

    keep = [np.isfinite(s.x) & np.isfinite(s.y) for s in series]
    if any(k.any() for k in keep):
        xs = np.concatenate([s.x[k] for s, k in zip(series, keep)])
        ys = np.concatenate([s.y[k] for s, k in zip(series, keep)])
    else:  # nothing to draw: empty axes
        xs = ys = np.array([0.0, 1.0])
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = float(ys.min()), float(ys.max())
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = 0.05 * (y_hi - y_lo) if y_hi > y_lo else 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x: np.ndarray) -> np.ndarray:
        return left + (np.asarray(x) - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: np.ndarray) -> np.ndarray:
        return bottom - (np.asarray(y) - y_lo) / (y_hi - y_lo) * (bottom - top)

    grid, ink = (225, 225, 225), (0, 0, 0)
    for ticks, horizontal in ((nice_ticks(y_lo, y_hi), True), (nice_ticks(x_lo, x_hi, 8), False)):
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for value in ticks:
            label = tick_label(value, step)
            if horizontal:
                y = int(round(float(py(value))))
                canvas.rect(left, y, right, y, grid)
                canvas.rect(left - 5, y, left - 1, y, ink)
                canvas.text(left - 8 - Canvas.text_width(label), y - 5, label)
            else:
                x = int(round(float(px(value))))
                canvas.rect(x, top, x, bottom, grid)
                canvas.rect(x, bottom + 1, x, bottom + 5, ink)
                canvas.text(x - Canvas.text_width(label) // 2, bottom + 10, label)

    for s, k in sorted(zip(series, keep), key=lambda sk: sk[0].width):  # thin lines first, thick ones on top
        canvas.polyline(px(s.x[k]), py(s.y[k]), s.color, s.width, box)
        if s.markers:
            canvas.points(px(s.x[k]), py(s.y[k]), s.color, s.width + 4, box)

    for x0, y0, x1, y1 in ((left, top, right, top), (left, bottom, right, bottom)):  # the frame
        canvas.rect(x0, y0, x1, y1, ink)
    canvas.rect(left, top, left, bottom, ink)
    canvas.rect(right, top, right, bottom, ink)

    canvas.text(right - Canvas.text_width("step"), bottom + 24, "step")
    x, y = right + 20, top
    for label, line_width in styles:
        canvas.rect(x, y + 4, x + 24, y + 4 + line_width - 1, (60, 60, 60))
        canvas.text(x + 32, y, label)
        y += 22
    for i, (label, color) in enumerate(legend):
        cx, cy = x + 70 * (i // per_column), y + 18 * (i % per_column)
        canvas.rect(cx, cy, cx + 11, cy + 11, color)
        canvas.text(cx + 18, cy + 1, label)
    return canvas.pixels


def _lighter(color: tuple[int, int, int], amount: float = 0.5) -> tuple[int, int, int]:
    return tuple(int(round(c + (255 - c) * amount)) for c in color)


def plot_runs(runs: Sequence[Run], path: Path) -> Path:
    """Write the val/loss and train/loss curves of ``runs`` to the PNG file ``path``."""
    series = []
    for i, run in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        if "train/loss" in run.curves:
            series.append(Series(*run.curves["train/loss"], color=_lighter(color), width=1))
        if "val/loss" in run.curves:
            series.append(Series(*run.curves["val/loss"], color=color, width=3, markers=True))
    legend = [(str(i), PALETTE[i % len(PALETTE)]) for i in range(len(runs))]
    image = line_plot(series, legend, styles=[("val/loss", 3), ("train/loss", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


# --------------------------------------------------------------------------------------------- command line


def labels_for(paths: Sequence[Path]) -> tuple[list[str], Path]:
    """Each run's path relative to the runs' common parent, and that parent."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath(resolved)) if resolved else Path.cwd()
    if len(resolved) == 1:
        root = resolved[0].parent
    return [str(p.relative_to(root)) for p in resolved], root


def summarize(paths: Sequence[str | Path], plot: Path | None | bool = True, sort: str = "path") -> str:
    """The report `python -m llm.runs` prints; ``plot``: a PNG path, True for the default, False for none."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise UserError(f"no runs (directories with .hydra/config.yaml) under {', '.join(map(str, paths))}")
    now = time.time()
    runs = [load_run(p, now) for p in run_dirs]
    if sort == "loss":
        runs.sort(key=lambda r: (r.val_loss is None, r.val_loss if r.val_loss is not None else 0.0))
    labels, root = labels_for([r.path for r in runs])
    lines = [f"{len(runs)} run{'s' * (len(runs) != 1)} under {root}", "", table(runs, labels)]
    if plot:
        target = root / "runs.png" if plot is True else Path(plot)
        plot_runs(runs, target)
        lines += ["", f"plot: {target} (val/loss thick, train/loss thin; colours numbered as the rows)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llm.runs",
        description="Compare runs: settings that differ, final val/loss, tokens/s, wall time, status; plot the "
        "loss curves to a PNG.",
    )
    parser.add_argument("paths", nargs="+", help="run directories or folders holding runs (searched recursively)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (default: <common parent>/runs.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--sort", choices=["path", "loss"], default="path", help="row order (default: path)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.paths, plot=False if args.no_plot else (args.plot or True), sort=args.sort))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
