"""DDP and FSDP2 on CPU with 2 processes (gloo), run as a user types them: `python train.py trainer=...`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from llm.checkpoints import consolidate
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
