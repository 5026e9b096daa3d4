"""Compare runs: `python -m llm.runs DIR [DIR ...]` prints a table of the runs and plots their loss curves to a PNG.

A run is a directory holding `.hydra/config.yaml` (train.py writes one per run, and one per job of a `-m` sweep);
each DIR is a run, or a folder searched recursively for runs. The table has one row per run:
- the settings that differ between the runs: the keys overridden on the command line (`.hydra/overrides.yaml`;
  a group such as `model=small` shows the chosen option) and any other key of the saved configs that differs;
- the final val/loss and val/bpb (bits per byte), the median tokens/s, the wall time and the number of optimizer steps;
- the status: `ok`, `stopped` (by a signal) or `failed: <first line of the error>` from `status.json`, which
  train.py writes when a run ends; without it `running` (a file of the run changed less than RUNNING_WINDOW_S
  ago) or `unknown`.
Numbers come from status.json when it has them, else from the TensorBoard event files of the run.

The plot (default `runs.png` in the common parent of the runs; `--plot PATH`, `--no-plot`) draws val/loss (thick,
with a marker at each validation) and train/loss (thin, lighter) against the step, one colour per run; the legend
gives each colour the run's number in the table and its label. It is drawn with matplotlib (llm/training/plots.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.errors import LLMError, UserError
from llm.training.plots import save_runs_plot

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
    val_bpb: float | None = None  # bits per byte: comparable across tokenizers
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
    if scalars.get("val/bpb"):
        run.val_bpb = _finite(scalars["val/bpb"][-1][2])
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
        run.val_bpb = _finite(status.get("val_bpb")) if "val_bpb" in status else run.val_bpb
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
    header = ["#", "run", *shown, "val/loss", "val/bpb", "tok/s", "wall", "steps", "status"]
    rows = [
        [
            str(i),
            label,
            *(value_of(run, k) for k in shown),
            _number(run.val_loss, ".4f"),
            _number(run.val_bpb, ".4f"),
            _number(run.tokens_per_sec, ",.0f"),
            _duration(run.wall_s),
            "-" if run.steps is None else str(run.steps),
            run.status_text,
        ]
        for i, (run, label) in enumerate(zip(runs, labels))
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    numeric = {0, *range(len(header) - 6, len(header) - 1)}  # right-aligned columns

    def line(row: list[str]) -> str:
        cells = [cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join([*cells, row[-1]]).rstrip()

    lines = [line(header), *(line(row) for row in rows)]
    if hidden:
        lines.append(f"(also differ: {', '.join(hidden)})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the plot

MAX_LEGEND_LABEL = 28  # characters of a run's label in the legend: deep paths keep their distinctive end


def _legend_name(number: int, label: str | None) -> str:
    if label is None:
        return f"#{number}"
    if len(label) > MAX_LEGEND_LABEL:
        label = "…" + label[-(MAX_LEGEND_LABEL - 1) :]
    return f"#{number} {label}"


def plot_runs(runs: Sequence[Run], path: Path, labels: Sequence[str] | None = None) -> Path:
    """Write the val/loss and train/loss curves of ``runs`` to the PNG file ``path``; the legend gives each colour
    the run's number in the table, and its label when ``labels`` are given."""
    names = [_legend_name(i, None if labels is None else labels[i]) for i in range(len(runs))]
    return save_runs_plot([run.curves for run in runs], names, path)


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
        plot_runs(runs, target, labels)
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
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
