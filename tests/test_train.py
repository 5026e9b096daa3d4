"""End to end: train.py through Hydra's compose API, and as a user runs it from the shell."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from tests.conftest import ROOT


def read_tags(logdir) -> dict[str, list]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": tags["scalars"], "tensors": tags["tensors"], "acc": acc}


@pytest.mark.slow
def test_pretrain_writes_run_directory(tiny_cfg):
    cfg = tiny_cfg()
    val_loss = train.train(cfg)
    assert math.isfinite(val_loss)

    run = Path(cfg.run_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "tokenizer.json").is_file()
    report = json.loads((run / "data_report.json").read_text())
    assert report["documents"]["kept"] > 0 and report["tokens"]["train"] > 0

    tags = read_tags(run / "tensorboard")
    for tag in ["train/loss", "val/loss", "val/bpb", "val/ppl", "val/acc", "perf/tokens_per_sec", "perf/mfu"]:
        assert tag in tags["scalars"], tag
    assert any(t.startswith("lr-") for t in tags["scalars"])
    assert any(t.startswith("samples/") for t in tags["tensors"])
    assert not (ROOT / "lightning_logs").exists()


def test_user_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=text",
            f"data.paths=[{tmp_path}/missing.txt]",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "missing.txt" in proc.stderr.strip().splitlines()[-1]


def test_validation_off_finishes_ok_with_the_last_train_loss(tmp_path, data_cache):
    """`trainer.limit_val_batches=0`: no validation at all; the job still ends `ok`, and says so."""
    from tests.conftest import TINY

    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "trainer.limit_val_batches=0", f"data.cache_dir={data_cache}"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok" and status["validation"] == "off"
    tags = read_tags(run / "tensorboard")
    assert "val/loss" not in tags["scalars"]
    last_train_loss = tags["acc"].Scalars("train/loss")[-1].value
    assert status["train_loss"] == pytest.approx(last_train_loss, rel=1e-6)
    assert (run / "checkpoints" / "last.ckpt").is_file()
