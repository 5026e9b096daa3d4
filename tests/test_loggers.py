"""Experiment tracking beyond TensorBoard: real runs logged to W&B (offline) and MLflow (SQLite), then read back from
what they wrote; several loggers at once; a missing package or key in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from llm.app import loggers
from llm.app.builders import build_all, check_all
from llm.errors import UserError
from tests.conftest import ROOT, TINY, compose_config

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
HAVE_MLFLOW = all(importlib.util.find_spec(m) is not None for m in ("mlflow", *loggers.SQL_NEEDS))
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason='wandb is not installed (pip install -e ".[tracking]")')
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason='mlflow is not installed (pip install -e ".[tracking]")')


def offline_env(tmp: Path) -> dict[str, str]:
    """W&B offline, its caches and settings under ``tmp`` (nothing written to ~), and no MLflow server named."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp / var.lower())
    env["WANDB_MODE"] = "offline"
    return env


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """``offline_env`` in this process, restored afterwards (WandbLogger sets WANDB_MODE for the process)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in offline_env(tmp_path).items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the run's offline log (``<run_dir>/wandb/offline-run-*/run-*.wandb``), read by wandb's own
    reader: ``wandb leet inspect --json`` prints each record as a JSON line (wandb >= 0.31; the Python SDK has no
    reader of its own since the log moved to wandb-core)."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=offline_env(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(trainer/global_step, value) of ``key`` in the order logged: Lightning's WandbLogger logs the step as a
    metric, W&B's own ``_step`` counts calls."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [(int(row["trainer/global_step"]), float(row[key])) for row in rows if key in row]


def wandb_config(records: list[dict]) -> dict:
    config: dict = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
    return config


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_run(run_dir: Path):
    """The one run in the run directory's MLflow store (conf/logger/mlflow.yaml: sqlite:///<run_dir>/mlflow.db)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "pretrain"]
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def assert_same_points(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)  # TensorBoard stores float32


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_cache) -> Path:
    """Two jobs of one sweep, as a user types it, each logging to TensorBoard, W&B and MLflow at once. A sweep runs
    its jobs in one process: each job must get a W&B run of its own (train.run ends it, llm/app/loggers.py)."""
    if not (HAVE_WANDB and HAVE_MLFLOW):
        pytest.skip('wandb or mlflow is not installed (pip install -e ".[tracking]")')
    out = tmp_path_factory.mktemp("tracked")
    cmd = [sys.executable, "train.py", "-m", *TINY, f"data.cache_dir={data_cache}", f"hydra.sweep.dir={out}"]
    cmd += ["logger=[tensorboard,wandb,mlflow]", "seed=1,2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=offline_env(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("job", ["0", "1"])
def test_wandb_offline_run_holds_the_losses_at_their_steps(sweep_dir, job):
    run_dir = sweep_dir / job
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "llm-trainer"
    assert any(r["type"] == "exit" for r in records)  # the run was ended by its job, not left to the process's exit
    train_loss, val_loss = wandb_history(records, "train/loss"), wandb_history(records, "val/loss")
    assert [s for s, _ in train_loss] == list(range(6))  # trainer.max_steps=6, logged every step
    assert [s for s, _ in val_loss][:3] == [0, 2, 5]  # step 0, every 3 steps, then the best checkpoint's
    assert_same_points(train_loss, tensorboard_scalars(run_dir, "train/loss"))
    assert_same_points(val_loss, tensorboard_scalars(run_dir, "val/loss"))
    config = wandb_config(records)  # the HParams callback's settings and the module's hyper-parameters
    assert config["seed"] == int(job) + 1 and config["optim.lr"] == pytest.approx(3e-3)
    assert config["model.dim"] == 64 and config["model"]["dim"] == 64
    assert wandb_history(records, "hp/val_loss")[-1][1] == pytest.approx(val_loss[-1][1])


@pytest.mark.slow
def test_each_job_of_a_sweep_has_its_own_wandb_run(sweep_dir):
    ids = [[r["run"]["run_id"] for r in wandb_records(sweep_dir / job) if r["type"] == "run"] for job in "01"]
    assert len({i for run_ids in ids for i in run_ids}) == 2, ids


@pytest.mark.slow
def test_mlflow_store_holds_the_metric_history_and_params(sweep_dir):
    run_dir = sweep_dir / "0"
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir)
    val_loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]  # "/" is kept
    assert_same_points(val_loss, tensorboard_scalars(run_dir, "val/loss"))
    train_loss = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert_same_points(train_loss, tensorboard_scalars(run_dir, "train/loss"))
    params = run.data.params  # MLflow keeps every value as a string
    assert params["seed"] == "1" and float(params["optim.lr"]) == pytest.approx(3e-3) and params["model.dim"] == "64"
    assert run.data.metrics["hp/val_loss"] == pytest.approx(val_loss[-1][1])


@pytest.mark.slow
def test_tensorboard_is_unchanged_beside_the_trackers(sweep_dir):
    run_dir = sweep_dir / "1"
    assert tensorboard_scalars(run_dir, "val/loss") and tensorboard_scalars(run_dir, "perf/tokens_per_sec")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert any(t.startswith("samples/") for t in acc.Tags()["tensors"])  # the text samples still reach TensorBoard
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"


@pytest.mark.slow
@needs_wandb
@needs_mlflow
def test_trackers_without_tensorboard(tiny_cfg, offline):
    """The callbacks that write TensorBoard-only things (text samples, the HParams tab) skip loggers of other kinds
    and still give those the settings and final metrics; when train.run returns, the job's W&B run has ended and the
    process environment is as before (llm/app/loggers.py, tracking_scope)."""
    import wandb

    cfg = tiny_cfg("logger=[wandb,mlflow]", "trainer.max_steps=3")
    try:
        val_loss = train.train(cfg)
        assert wandb.run is None
        # as the job found them: mlflow had set the URI of this run's store for the whole process, Lightning the mode
        assert "MLFLOW_TRACKING_URI" not in os.environ and os.environ["WANDB_MODE"] == "offline"
    finally:
        wandb.teardown()  # W&B's service process, started by this run
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "tensorboard").exists()
    assert wandb_history(wandb_records(run_dir), "val/loss")[-1][1] == pytest.approx(val_loss)
    _, run = mlflow_run(run_dir)
    assert run.data.metrics["val/loss"] == pytest.approx(val_loss) and "optim.lr" in run.data.params


def test_missing_package_is_one_line(tmp_path):
    """`logger=wandb` without wandb: one line with the install command, exit 2, before any data is read."""
    hide = (
        "import importlib.util as u, runpy, sys; find = u.find_spec;"
        "u.find_spec = lambda name, *a: None if name == 'wandb' else find(name, *a);"
        "sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", hide, *TINY, "logger=[tensorboard,wandb]", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=offline_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'error: logger=wandb needs the wandb package: pip install -e ".[tracking]"'
    )
    assert not (tmp_path / "run" / "data_report.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason='mlflow is not installed (".[tracking]")')
def test_mlflow_database_store_needs_sqlalchemy(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else find(name, *a))
    node = OmegaConf.create({"_target_": "lightning.pytorch.loggers.MLFlowLogger", "tracking_uri": "sqlite:///x.db"})
    with pytest.raises(
        UserError, match=r'^logger=mlflow needs the sqlalchemy package: pip install -e "\.\[tracking\]"$'
    ):
        loggers.check_installed("mlflow", node)
    loggers.check_installed("mlflow", OmegaConf.merge(node, {"tracking_uri": "http://127.0.0.1:5000"}))  # a server


@pytest.mark.parametrize(
    ("override", "named"),
    [
        pytest.param("+logger.wandb.projet=x", "projet", marks=needs_wandb),  # WandbLogger's **kwargs: wandb.init's
        pytest.param("+logger.mlflow.tracking_url=x", "tracking_url", marks=needs_mlflow),
        ("+logger.tensorboard.nme=x", "nme"),
    ],
)
def test_unknown_logger_key_is_named_on_one_line(tmp_path, override, named):
    option = override.split(".")[1]
    cfg = compose_config([f"logger=[tensorboard,{option}]", override], tmp_path)
    for check in (check_all, build_all):  # train.py checks before the data is read; build_all again when it builds
        with pytest.raises(UserError) as err:
            check(cfg.logger)
        message = str(err.value)
        assert "\n" not in message and named in message and message.startswith(f"`{option}`")


@needs_mlflow
def test_mlflow_database_store_is_opened_by_rank_zero_alone(tmp_path, monkeypatch):
    """Every rank builds the loggers; two creating one SQLite store at once collide, so ranks > 0 skip MLflow's."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    cfg = compose_config(["logger=[tensorboard,mlflow]"], tmp_path)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert [type(lg) for lg in build_all(cfg.logger)] == [TensorBoardLogger]
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert [type(lg) for lg in build_all(cfg.logger)] == [TensorBoardLogger, MLFlowLogger]
    assert (tmp_path / "mlflow.db").exists()
