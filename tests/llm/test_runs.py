"""python -m llm.runs: finding runs, reading them back, the table of differences, and the PNG of the curves."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from llm import runs
from llm.training.plots import RUN_COLORS

# ------------------------------------------------------------------------------------------------------- runs


def make_run(
    path: Path,
    overrides: list[str],
    config: dict,
    *,
    model: str = "tiny",
    status: dict | None = None,
    scalars: dict[str, list[tuple[int, float]]] | None = None,
    age_s: float = 0.0,
) -> Path:
    """A run directory as train.py leaves it: .hydra/ files, status.json, TensorBoard events."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"model": model, "experiment": "pretrain", "hydra/sweeper": "basic"}
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if status is not None:
        (path / "status.json").write_text(json.dumps(status))
    if scalars:
        writer = SummaryWriter(str(path / "tensorboard"))
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
    if age_s:
        old = time.time() - age_s
        for f in path.rglob("*"):
            os.utime(f, (old, old))
    return path


def config(lr: float, dim: int = 64) -> dict:
    return {"task": "pretrain", "run_dir": "${hydra:runtime.output_dir}", "model": {"dim": dim}, "optim": {"lr": lr}}


LOSSES = {
    "train/loss": [(0, 8.0), (1, 7.0), (2, 6.5), (3, 6.0)],
    "val/loss": [(0, 8.1), (3, 6.2)],
    "perf/tokens_per_sec": [(1, 100.0), (2, 300.0), (3, 200.0)],
}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    make_run(
        root / "0",
        ["optim.lr=1e-3"],
        config(1e-3),
        status={"status": "ok", "val_loss": 6.1, "val_bpb": 2.25, "wall_s": 65},
    )
    make_run(
        root / "10",
        ["optim.lr=3e-3", "model=small"],
        config(3e-3, dim=768),
        model="small",
        status={"status": "failed", "error": "model: n_heads must divide dim\nmore detail", "wall_s": 1.5},
    )
    make_run(root / "2", ["optim.lr=1e-3"], config(1e-3), scalars=LOSSES, age_s=3600)  # killed: no status
    shifted = {tag: [(step, value + 0.5) for step, value in points] for tag, points in LOSSES.items()}
    make_run(root / "3", ["optim.lr=1e-2"], config(1e-2), scalars=shifted)  # no status, files fresh: running
    (root / "multirun.yaml").write_text("{}")
    return root


def test_find_runs_recursively_in_natural_order(sweep):
    found = runs.find_runs([sweep])
    assert [p.name for p in found] == ["0", "2", "3", "10"]
    assert runs.find_runs([sweep / "2", sweep]) == found  # a run given twice is listed once
    with pytest.raises(runs.UserError, match="missing"):
        runs.find_runs([sweep / "missing"])


def test_load_run_reads_status_and_events(sweep):
    ok, failed = runs.load_run(sweep / "0"), runs.load_run(sweep / "10")
    assert (ok.status, ok.val_loss, ok.wall_s, ok.status_text) == ("ok", 6.1, 65, "ok")
    assert ok.val_bpb == 2.25 and runs.load_run(sweep / "2").val_bpb is None  # from status.json; none logged
    assert failed.status_text == "failed: model: n_heads must divide dim"

    killed = runs.load_run(sweep / "2")
    assert killed.status == "unknown"
    assert killed.val_loss == pytest.approx(6.2)  # the last val/loss written
    assert killed.tokens_per_sec == pytest.approx(200.0)  # median
    assert killed.steps == 4
    steps, values = killed.curves["train/loss"]
    assert steps.tolist() == [0, 1, 2, 3] and values.tolist() == [8.0, 7.0, 6.5, 6.0]
    assert runs.load_run(sweep / "3").status == "running"


def test_curve_keeps_the_last_value_of_a_step_logged_twice():
    steps, values = runs.curve([(0, 0.0, 5.0), (1, 0.0, 4.0), (2, 0.0, 3.0), (1, 1.0, 4.5), (2, 1.0, 3.5)])
    assert steps.tolist() == [0, 1, 2] and values.tolist() == [5.0, 4.5, 3.5]


def test_differing_keys_prefer_what_was_typed(sweep):
    loaded = [runs.load_run(p) for p in runs.find_runs([sweep])]
    keys = runs.differing_keys(loaded)
    assert keys == ["optim.lr", "model"]  # model.dim differs too, but model=small explains it
    assert [runs.value_of(r, "model") for r in loaded] == ["tiny", "tiny", "tiny", "small"]
    assert [runs.value_of(r, "optim.lr") for r in loaded] == ["0.001", "0.001", "0.01", "0.003"]
    assert runs.differing_keys(loaded[:2]) == []  # the same settings


def test_differing_keys_from_configs_when_nothing_was_typed(tmp_path):
    a = runs.load_run(make_run(tmp_path / "a", [], config(1e-3, dim=64)))
    b = runs.load_run(make_run(tmp_path / "b", [], config(1e-3, dim=128)))
    assert runs.differing_keys([a, b]) == ["model.dim"]


def test_summarize_prints_the_table_and_writes_the_plot(sweep, tmp_path):
    plot = tmp_path / "plot.png"
    text = runs.summarize([sweep], plot=plot)
    lines = text.splitlines()
    assert lines[0] == f"4 runs under {sweep.resolve()}"
    header = lines[2].split()
    assert header == ["#", "run", "optim.lr", "model", "val/loss", "val/bpb", "tok/s", "wall", "steps", "status"]
    rows = {line.split()[1]: line for line in lines[3:7]}
    assert rows["0"].split()[2:] == ["0.001", "tiny", "6.1000", "2.2500", "-", "1m05s", "-", "ok"]
    assert rows["10"].endswith("failed: model: n_heads must divide dim")
    assert rows["2"].split()[4:9] == ["6.2000", "-", "200", "0s", "4"]
    assert rows["3"].split()[4] == "6.7000" and rows["3"].endswith("running")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(plot)[..., :3]  # floats in 0..1
    assert pixels.shape[:2] == (540, 960)

    def drawn_in(color) -> int:
        return int((np.abs(pixels - np.asarray(color)) <= 0.06).all(axis=-1).sum())

    for i in (1, 2):  # the runs with curves (#1 and #2 of the table) are drawn in their colours
        assert drawn_in(RUN_COLORS[i]) > 1000, i
    assert drawn_in(RUN_COLORS[0]) < 500 and drawn_in(RUN_COLORS[3]) < 500  # no curves: only the legend's sample


def test_summarize_sorts_by_loss(sweep):
    text = runs.summarize([sweep], plot=False, sort="loss")
    order = [line.split()[1] for line in text.splitlines()[3:7]]
    assert order == ["0", "2", "3", "10"]  # 6.1, 6.2, 6.7, then no loss


def test_main_writes_the_default_plot_and_reports_errors(sweep, capsys):
    runs.main([str(sweep / "0"), str(sweep / "2")])
    out = capsys.readouterr().out
    assert "2 runs under" in out and (sweep / "runs.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        runs.main([str(sweep / "nope")])
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_plot_legend_names_the_rows(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runs, "save_runs_plot", lambda curves, names, path: seen.update(names=names, curves=curves))
    loaded = [runs.Run(path=tmp_path / "a"), runs.Run(path=tmp_path / "b", curves={"val/loss": LOSSES["val/loss"]})]
    runs.plot_runs(loaded, tmp_path / "p.png", ["sweep/0", "x" * 40])
    assert seen["names"] == ["#0 sweep/0", "#1 …" + "x" * 27]  # long labels keep their end
    assert seen["curves"][1] == {"val/loss": LOSSES["val/loss"]}
    runs.plot_runs(loaded, tmp_path / "p.png")
    assert seen["names"] == ["#0", "#1"]
