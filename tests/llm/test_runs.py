"""python -m llm.runs: finding runs, reading them back, the table of differences, and the PNG line plot."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from llm import runs
from llm.runs import Canvas, Series, line_plot, nice_ticks, png_bytes, tick_label

# ------------------------------------------------------------------------------------------------------- PNG


def parse_png(data: bytes) -> tuple[dict, np.ndarray]:
    """A minimal PNG reader for the files png_bytes writes: checks the signature, every chunk's CRC, the order of
    the chunks, and returns the header fields and the (H, W, 3) pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    header = dict(width=width, height=height, depth=depth, color=color, interlace=interlace)
    assert (compression, filtering) == (0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return header, rows[:, 1:].reshape(height, width, 3)


def test_png_bytes_is_a_valid_png_of_the_image():
    image = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    header, pixels = parse_png(png_bytes(image))
    assert header == dict(width=13, height=7, depth=8, color=2, interlace=0)
    np.testing.assert_array_equal(pixels, image)


def test_png_bytes_opens_in_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # not a dependency: an independent decoder when present
    image = np.zeros((5, 9, 3), dtype=np.uint8)
    image[2, 3] = (255, 0, 10)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(image))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (9, 5) and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), image)


def test_png_bytes_refuses_other_arrays():
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 3), dtype=np.float32))


def test_polyline_draws_straight_segments():
    canvas = Canvas(12, 10, background=(0, 0, 0))
    canvas.polyline(np.array([2.0, 8.0, 8.0]), np.array([5.0, 5.0, 1.0]), (255, 255, 255))
    on = set(zip(*np.nonzero(canvas.pixels[:, :, 0])))  # (y, x)
    assert on == {(5, x) for x in range(2, 9)} | {(y, 8) for y in range(1, 6)}


def test_polyline_is_clipped_to_the_box_and_thick():
    canvas = Canvas(20, 20, background=(0, 0, 0))
    canvas.polyline(np.array([-5.0, 25.0]), np.array([10.0, 10.0]), (9, 9, 9), width=3, box=(4, 0, 15, 19))
    ys, xs = np.nonzero(canvas.pixels[:, :, 0])
    assert xs.min() == 4 and xs.max() == 15 and set(ys) == {9, 10, 11}


def test_text_draws_the_glyphs():
    canvas = Canvas(20, 8, background=(0, 0, 0))
    end = canvas.text(1, 1, "1", color=(255, 255, 255), scale=1)
    glyph = canvas.pixels[1:6, 1:4, 0] > 0
    assert glyph.tolist() == [[c == "#" for c in row] for row in runs._GLYPHS["1"]]
    assert end == 5 and Canvas.text_width("12", scale=2) == 14


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [(0, 10, [0, 2, 4, 6, 8, 10]), (3.02, 3.98, [3.2, 3.4, 3.6, 3.8]), (0, 600, [0, 200, 400, 600])],
)
def test_nice_ticks(lo, hi, expected):
    assert nice_ticks(lo, hi, target=5) == pytest.approx(expected)


def test_tick_labels_have_the_decimals_of_the_spacing():
    assert tick_label(1000.0, 500.0) == "1000"
    assert tick_label(3.5, 0.5) == "3.5"
    assert tick_label(0.25, 0.25) == "0.25"


def test_line_plot_draws_each_series_in_its_colour():
    red, blue = (200, 0, 0), (0, 0, 200)
    image = line_plot(
        [
            Series(np.array([0.0, 10.0]), np.array([0.0, 10.0]), red, width=3),  # rising
            Series(np.array([0.0, 10.0]), np.array([10.0, 0.0]), blue, width=1, markers=True),  # falling
        ],
        legend=[("0", red), ("1", blue)],
        styles=[("val/loss", 3), ("train/loss", 1)],
        size=(400, 300),
    )
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8

    def where(color):
        ys, xs = np.nonzero((image == color).all(axis=2))
        plot = xs < 250  # left of the legend
        return xs[plot], ys[plot]

    for color, rising in ((red, True), (blue, False)):
        xs, ys = where(color)
        assert len(xs) > 100
        slope = np.polyfit(xs, ys, 1)[0]  # pixel y grows downwards
        assert (slope < -0.5) if rising else (slope > 0.5)
    legend = image[:, 250:]
    assert (legend == red).all(axis=2).sum() >= 100 and (legend == blue).all(axis=2).sum() >= 100  # the squares


def test_line_plot_without_data_is_still_an_image():
    image = line_plot([Series(np.array([1.0]), np.array([np.nan]), (1, 2, 3))])
    assert png_bytes(image)[:4] == b"\x89PNG"


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
    make_run(root / "0", ["optim.lr=1e-3"], config(1e-3), status={"status": "ok", "val_loss": 6.1, "wall_s": 65})
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
    assert header == ["#", "run", "optim.lr", "model", "val/loss", "tok/s", "wall", "steps", "status"]
    rows = {line.split()[1]: line for line in lines[3:7]}
    assert rows["0"].split()[2:] == ["0.001", "tiny", "6.1000", "-", "1m05s", "-", "ok"]
    assert rows["10"].endswith("failed: model: n_heads must divide dim")
    assert rows["2"].split()[4:8] == ["6.2000", "200", "0s", "4"]
    assert rows["3"].split()[4] == "6.7000" and rows["3"].endswith("running")
    header_png, pixels = parse_png(plot.read_bytes())
    assert (header_png["width"], header_png["height"]) == (960, 540)
    for i in (1, 2):  # the runs with curves (#1 and #2 of the table) are drawn in their colours
        assert (pixels == runs.PALETTE[i]).all(axis=2).sum() > 200


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
