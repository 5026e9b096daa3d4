"""Sweeps as a user runs them (`python train.py -m ...`): a run directory and TensorBoard logs per job, the HParams
tab, failed jobs recorded while the sweep goes on, an Optuna search, and `python -m llm.runs` reading them back."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata

from callbacks.hparams import HParams, flatten
from llm import runs
from tests.conftest import ROOT, TINY, compose_config

TAGS = [
    "train/loss",
    "val/loss",
    "perf/tokens_per_sec",
    "perf/peak_memory_gb",
    "perf/planned_memory_gb",
    "norms/grad_total",
    "norms/param/layers.0",
    "norms/update/layers.0",
    "hp/val_loss",
    "hp/val_bpb",
    "hp/tokens_per_sec",
    "val/bpb",
]


def sweep(sweep_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py -m` with the TINY settings (those not swept here), norms every 2 steps."""
    swept = {o.split("=")[0].lstrip("+") for o in overrides}
    base = [o for o in TINY if o.split("=")[0] not in swept]
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *base,
        "callbacks.norms.every_n_steps=2",
        f"data.cache_dir={cache}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def session_hparams(run_dir: Path) -> dict:
    """The hyper-parameters of the run's HParams summary (what TensorBoard's HParams tab shows)."""
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
                    info = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    return {k: v.number_value or v.string_value for k, v in info.hparams.items()}
    return {}


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_sweep_directories_come_from_the_config(tmp_path):
    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert conf["hydra"]["sweep"] == {
        "dir": "outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}",
        "subdir": "${hydra.job.num}",
    }
    assert conf["run_dir"] == "${hydra:runtime.output_dir}"  # a job's own directory in a sweep
    cfg = compose_config([], run_dir=tmp_path / "job")
    assert cfg.logger.tensorboard.save_dir == str(tmp_path / "job")  # so each job logs to <job>/tensorboard


def test_hparams_flattens_settings_for_tensorboard():
    flat = flatten({"model": {"_target_": "x", "dim": 64, "rope_scaling": None}, "optim": {"betas": [0.9, 0.95]}})
    assert flat == {"model.dim": 64, "model.rope_scaling": "null", "optim.betas": "[0.9, 0.95]"}
    with pytest.raises(ValueError, match="must differ"):
        HParams(metrics={"val/loss": "val/loss"})


@pytest.mark.slow
def test_sweep_runs_each_job_in_its_own_directory_and_goes_on_after_a_failure(tmp_path, data_cache):
    """Four jobs; model.dim=64 with 3 heads is refused, and the sweep goes on (train.py records it in status.json)."""
    sweep_dir = tmp_path / "sweep"
    sweep(sweep_dir, data_cache, "model.n_heads=4,3", "model.n_kv_heads=1", "optim.lr=1e-3,3e-3")

    jobs = [sweep_dir / str(i) for i in range(4)]
    assert runs.find_runs([sweep_dir]) == jobs
    for job, lr in zip(jobs[:2], (1e-3, 3e-3)):
        assert status(job)["status"] == "ok" and math.isfinite(status(job)["val_loss"])
        acc = scalars(job)
        for tag in TAGS:
            assert tag in acc.Tags()["scalars"], (job, tag)
        assert [e.step for e in acc.Scalars("norms/grad_total")] == [0, 2, 4]  # every 2 of the 6 steps
        # the HParams tab: the job's settings, and the final val/loss under its own tag (val/loss is untouched)
        hparams = session_hparams(job)
        assert hparams["optim.lr"] == pytest.approx(lr) and hparams["model.n_heads"] == 4
        assert hparams["model.vocab_size"] > 0  # as the model was built, not null
        assert acc.Scalars("hp/val_loss")[-1].value == pytest.approx(status(job)["val_loss"], rel=1e-5)
        assert acc.Scalars("hp/val_bpb")[-1].value == pytest.approx(status(job)["val_bpb"], rel=1e-5)
        assert acc.Scalars("val/loss")[-1].value == pytest.approx(status(job)["val_loss"], rel=1e-5)
    for job in jobs[2:]:
        assert status(job)["status"] == "failed" and "n_heads=3" in status(job)["error"]

    proc = subprocess.run(
        [sys.executable, "-m", "llm.runs", str(sweep_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].split()[:4] == ["#", "run", "model.n_heads", "optim.lr"]
    rows = [line.split() for line in lines[3:7]]
    assert [row[:4] for row in rows] == [
        ["0", "0", "4", "0.001"],
        ["1", "1", "4", "0.003"],
        ["2", "2", "3", "0.001"],
        ["3", "3", "3", "0.003"],
    ]
    assert rows[0][-1] == rows[1][-1] == "ok"
    assert all("failed:" in row and "n_heads=3" in " ".join(row) for row in rows[2:])
    assert (sweep_dir / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="hydra-optuna-sweeper is not installed (pip install -e '.[optuna]')",
)
def test_optuna_search_minimises_the_final_val_loss(tmp_path, data_cache):
    defaults = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    search = "hparams_search=optuna" if listed else "+hparams_search=optuna"  # the group is optional
    sweep_dir = tmp_path / "optuna"
    sweep(sweep_dir, data_cache, search, "hydra.sweeper.n_trials=2", "sched.warmup_steps=int(interval(0, 4))")

    jobs = runs.find_runs([sweep_dir])
    assert [job.name for job in jobs] == ["0", "1"]
    losses = [status(job)["val_loss"] for job in jobs]
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(losses))
    lrs = [session_hparams(job)["optim.lr"] for job in jobs]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]  # drawn from the search space
