"""profiler=pytorch (callbacks/profiler.py): a real run's trace, read as Chrome trace JSON and by TensorBoard's
PyTorch Profiler plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train
from tests.conftest import TINY, compose_config


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, data_cache) -> Path:
    """`profiler=pytorch` with a 1-step wait, 1 warm-up and 2 recorded steps, validation off (where Lightning's
    own PyTorchProfiler fails, callbacks/profiler.py)."""
    run_dir = tmp_path_factory.mktemp("profiled")
    overrides = ["profiler=pytorch", "callbacks.profiler.wait=1", "callbacks.profiler.active=2"]
    cfg = compose_config([*TINY, *overrides, "trainer.limit_val_batches=0"], run_dir=run_dir, cache_dir=data_cache)
    train.train(cfg)
    return run_dir


def test_profiler_writes_a_chrome_trace_of_the_window(profiled):
    (trace,) = (profiled / "profiler").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # torch counts from 0: optimizer steps 3 and 4
    assert any(e.get("name") == "aten::mm" for e in events)  # the model's operators, with their durations


def test_profiler_trace_opens_in_tensorboard_plugin(profiled, tmp_path):
    """The PyTorch Profiler tab of TensorBoard (torch-tb-profiler) parses the trace into its views."""
    pytest.importorskip("torch_tb_profiler", reason='torch-tb-profiler is not installed (pip install -e ".[tracking]")')
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    (trace,) = (profiled / "profiler").glob("*.pt.trace.json")
    worker, span = trace.name.split(".")[0], "1"
    data = RunProfileData.parse(worker, span, str(trace), str(tmp_path))
    assert data.steps_names == ["2", "3"]
    views = {v.display_name for v in RunGenerator(worker, span, data).generate_run_profile().views}
    assert {"Overview", "Operator", "Trace"} <= views


def test_profiler_run_shorter_than_the_window_writes_nothing(tiny_cfg):
    cfg = tiny_cfg("profiler=pytorch", "trainer.max_steps=2", "callbacks.samples=null")  # window: steps 7-9
    train.train(cfg)
    assert not list((Path(cfg.run_dir) / "profiler").glob("*.json"))
