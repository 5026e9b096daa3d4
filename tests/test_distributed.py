"""DDP and FSDP2 on CPU with 2 processes (gloo), run as a user types them: `python train.py trainer=...`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch

from llm.checkpoints import consolidate
from llm.runtime import launch
from tests.callbacks.test_embeddings import assert_written_once
from tests.conftest import ROOT, TINY
from tests.test_resume import losses

pytestmark = pytest.mark.slow

# 6 steps of the tiny model, float32 (so that the only differences are reduction orders)
BASE = [o for o in TINY if not o.startswith(("data.batch_size", "trainer.accelerator"))] + [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "callbacks.samples=null",
    "callbacks.progress_bar=null",
]


class ShardProbe(L.Callback):
    """Test helper: each rank writes the local and global shapes of its parameters at train start."""

    def on_train_start(self, trainer, pl_module) -> None:
        shapes = {}
        for name, p in pl_module.model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            shapes[name] = [list(local.shape), list(p.shape)]
        path = Path(trainer.default_root_dir) / f"shapes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(shapes))


def run(run_dir: Path, cache: Path, *extra: str, multirun: bool = False) -> subprocess.CompletedProcess:
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    cmd = [sys.executable, "train.py", *(["-m"] if multirun else []), *BASE, f"data.cache_dir={cache}", where, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = consolidate(last) if last.is_dir() else torch.load(last, weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def initial(tmp_path_factory, data_cache) -> Path:
    """Initial weights shared by the runs compared below (FSDP initialises a meta-device model shard by shard,
    with other random numbers than a model built whole): a run of one step at learning rate 0."""
    run_dir = tmp_path_factory.mktemp("initial")
    run(run_dir, data_cache, "trainer.max_steps=1", "optim.lr=0.0", "sched.min_lr=0.0")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache, initial):
    """The reference: one process, global batch 8."""
    run_dir = tmp_path_factory.mktemp("single")
    run(run_dir, data_cache, "data.batch_size=8", f"init_from={initial}")
    return run_dir


# two processes: data parallel (DDP, FSDP2: 4 + 4 windows per step), or tensor parallel (one data-parallel
# replica of 8 windows, each block's attention heads and MLP columns split over the two processes)
LAYOUTS = {
    "ddp": ["trainer=ddp", "data.batch_size=4"],
    "fsdp": ["trainer=fsdp", "data.batch_size=4"],
    "tp": ["trainer=fsdp", "trainer.strategy.tensor_parallel_size=2", "data.batch_size=8"],
}


@pytest.mark.parametrize("trainer", list(LAYOUTS))
def test_two_processes_match_one_with_the_same_global_batch(single, initial, tmp_path, data_cache, trainer):
    run_dir = tmp_path / trainer
    probe = ["+callbacks.probe._target_=tests.test_distributed.ShardProbe", f"init_from={initial}"]
    run(run_dir, data_cache, *LAYOUTS[trainer], "trainer.devices=2", *probe)
    assert_written_once(run_dir, steps=[0, 3, 6])  # the projector's files and the attention maps: by rank 0, once

    # the same 8 windows per step, split 4 + 4: losses and weights agree up to the order of float32 sums
    # (all-reduce and sharded reductions add in another order: ~1e-7 relative per step, 6 steps, Adam's
    # normalisation amplifies tiny gradient differences on near-zero coordinates: 1e-4 absolute is ample
    # and still far below the per-step loss changes of ~1e-2)
    # (train/loss is each rank's own half-batch; val/loss is reduced over ranks, so it is the comparable one)
    ref, got = losses(single, "val/loss"), losses(run_dir, "val/loss")
    assert sorted(ref) == sorted(got) and len(ref) >= 2
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step
    a, b = final_weights(single), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)

    # one run directory for both processes: rank 1 logged into it, nothing else was created
    assert (run_dir / "train_rank1.log").exists() or trainer == "ddp"
    assert sorted(p.name for p in run_dir.glob("shapes_rank*.json")) == ["shapes_rank0.json", "shapes_rank1.json"]
    shapes = json.loads((run_dir / "shapes_rank0.json").read_text())
    wq_local, wq_global = shapes["layers.0.attention.wq.weight"]
    if trainer in ("fsdp", "tp"):  # really sharded: each rank holds half the rows (FSDP: dim 0; TP: wq colwise)
        assert wq_local[0] * 2 == wq_global[0] and (run_dir / "checkpoints" / "last.ckpt").is_dir()
    if trainer == "tp":  # wo is split rowwise: half the columns each
        wo_local, wo_global = shapes["layers.0.attention.wo.weight"]
        assert wo_local[1] * 2 == wo_global[1] and wo_local[0] == wo_global[0]
    if trainer == "ddp":  # replicated
        assert wq_local == wq_global


def test_fsdp_sharded_checkpoint_resumes(tmp_path, data_cache):
    run_dir = tmp_path / "fsdp"
    fsdp = ["trainer=fsdp", "trainer.devices=2", "data.batch_size=4"]
    run(run_dir, data_cache, *fsdp, "trainer.max_steps=3")
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    proc = run(run_dir, data_cache, *fsdp, "trainer.max_steps=6", "ckpt_path=last")
    assert "Restored all states" in proc.stdout + proc.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 6
    # built on the meta device and materialised shard by shard: a sane initial loss (about ln(vocab)), finite after
    val = losses(run_dir, "val/loss")
    assert 5.0 < val[0] < 7.0 and all(0 < v < 10 for v in val.values()), val


def test_multirun_of_fsdp_jobs_runs_each_job_once(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    proc = run(
        sweep,
        data_cache,
        "trainer=fsdp",
        "trainer.devices=2",
        "data.batch_size=4",
        "trainer.max_steps=2",
        "optim.lr=1e-3,2e-3",
        multirun=True,
    )
    assert (proc.stdout + proc.stderr).count("Launching 2 jobs locally") == 1
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
        assert list((sweep / job / "tensorboard").glob("events.*"))


# A sweep runs its jobs one after another in one process. Lightning's launcher never waits for the processes it
# starts, and its observer thread SIGKILLs the launching process when one of them exits non-zero, also after
# the job: a child of job 0 still shutting down when job 1 starts, and ending with -6, killed the sweep in the
# middle of job 1 (seen as "child terminated with code -6" and a "Connection reset by peer" of job 1's child at
# the prepare_data barrier). The tests below play one job of a sweep: the launcher's environment, a child
# process and Lightning's own observer, watching a bystander that stands for the sweep's process.


@pytest.fixture
def job(monkeypatch):
    """Starts (inside a job_scope) what Lightning's launcher starts: its environment, a child, an observer."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    gate = threading.Event()

    class GatedObserver(_ChildProcessObserver):
        """Lightning's observer, whose first look waits for the test to open the gate after the job's end: without
        the fix it then finds the failed child and kills the bystander, with it there is nothing left to watch.
        No timing decides the outcome."""

        def run(self) -> None:
            gate.wait()
            super().run()

    started: dict = {"gate": gate}
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # the launching parent
    monkeypatch.setenv("LLM_TEST_CHANGED", "before")
    monkeypatch.setenv("LLM_TEST_REMOVED", "before")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    saved = dict(os.environ)
    started["bystander"] = bystander

    def start(child_code: str) -> None:
        started["environ"] = dict(os.environ)  # as the job found it
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", NODE_RANK="0", LOCAL_RANK="0")
        os.environ.update(WORLD_SIZE="2", PL_GLOBAL_SEED="1234", LLM_TEST_CHANGED="during")
        del os.environ["LLM_TEST_REMOVED"]
        child = subprocess.Popen([sys.executable, "-c", child_code])
        observer = GatedObserver(main_pid=bystander.pid, child_processes=[child], sleep_period=0.1)
        observer.start()
        started.update(child=child, observer=observer)

    yield start, started
    gate.set()  # also when the test failed before opening it
    os.environ.clear()  # whatever happened, the next tests get the environment back
    os.environ.update(saved)
    for proc in (bystander, started.get("child")):
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _ended_cleanly(started: dict) -> None:
    started["gate"].set()  # the observer's first look, after the job's end
    started["observer"].join(timeout=60)  # it found nothing left to watch: it ended without killing anyone
    assert not started["observer"].is_alive()
    assert started["bystander"].poll() is None  # the sweep's process lives on
    assert dict(os.environ) == started["environ"]  # added, changed and removed variables all restored


def test_multirun_job_end_waits_for_its_processes_and_disarms_their_observer(job):
    start, started = job
    with pytest.raises(RuntimeError, match="-6"):  # the child's failure fails its own job, not the next one
        with launch.job_scope():
            start("import os; os.abort()")  # a child that ends with -6 after the job's end (as in the issue)
    assert started["child"].returncode == -signal.SIGABRT  # waited for before the next job could start
    _ended_cleanly(started)


def test_multirun_job_end_ends_a_hung_process(job, monkeypatch):
    monkeypatch.setattr(launch, "CHILD_EXIT_TIMEOUT_S", 0.5)
    start, started = job
    with pytest.raises(RuntimeError, match=str(-signal.SIGTERM)):
        with launch.job_scope():
            start("import time; time.sleep(120)")
    assert started["child"].returncode == -signal.SIGTERM
    _ended_cleanly(started)


def test_multirun_failed_job_ends_its_processes(job):
    start, started = job
    with pytest.raises(ValueError, match="rank 0 failed"):  # the job's own error, not the children's
        with launch.job_scope():
            start("import time; time.sleep(120)")
            raise ValueError("rank 0 failed")
    assert started["child"].returncode is not None
    _ended_cleanly(started)
