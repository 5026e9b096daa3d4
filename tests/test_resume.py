"""Exact resume: a run stopped and resumed equals the run that was never stopped (issue: reliability)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from callbacks.resilience import LastCheckpoint
from llm.errors import UserError
from tests.conftest import ROOT, TINY, compose_config

# float32 on CPU: every kernel is deterministic, so equality is bitwise
EXACT = [
    "trainer.precision=32-true",
    "trainer.max_steps=8",
    "trainer.limit_train_batches=3",  # an epoch is 3 steps: the runs below cross epoch boundaries
    "trainer.val_check_interval=3",
    "callbacks.samples=null",
]


class StopAt(L.Callback):
    """Test helper: asks the real LastCheckpoint to save and stop at `step`, as a SIGTERM would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            for cb in trainer.callbacks:
                if isinstance(cb, LastCheckpoint):
                    cb.requested = "test"


def losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}  # a resumed step overwrites the earlier one


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_equals_uninterrupted(tmp_path, data_cache, workers):
    extra = [*TINY, *EXACT, f"data.num_workers={workers}"]
    straight = tmp_path / "straight"
    train.train(compose_config(extra, run_dir=straight, cache_dir=data_cache))

    resumed = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4"]  # mid-epoch
    train.train(compose_config([*extra, *stop], run_dir=resumed, cache_dir=data_cache))
    stopped_at = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert stopped_at in (4, 5)  # the step after the request: mid-epoch (an epoch is steps 4-6)
    train.train(compose_config([*extra, "ckpt_path=last"], run_dir=resumed, cache_dir=data_cache))

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(8))
    assert a == b  # every logged step, bitwise
    assert_same_weights(weights(straight), weights(resumed))


class SigtermAt(L.Callback):
    """Test helper: the scheduler's SIGTERM arrives at the end of a validation batch of `fn` at `step`."""

    def __init__(self, fn: str, step: int) -> None:
        self.fn, self.step = fn, step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == self.fn and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAfterValidation(SigtermAt):
    """Test helper: the SIGTERM arrives once `fn`'s validation at `step` is over (Lightning would forget it)."""

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == self.fn and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _run_with_sigterm(tiny_cfg, fn: str, step: int, helper: str = "SigtermAt"):
    handler = signal.getsignal(signal.SIGTERM)
    term = [
        f"+callbacks.term._target_=tests.test_resume.{helper}",
        f"+callbacks.term.fn={fn}",
        f"+callbacks.term.step={step}",
    ]
    cfg = tiny_cfg("callbacks.samples=null", *term)
    assert math.isnan(train.train(cfg))  # stopped by the signal: no final validation
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the run
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def test_sigterm_after_the_step0_validation_stops_after_one_step(tiny_cfg):
    # Lightning's own handler lives only inside each validate()/fit() call and forgets the signal at the next one
    last = _run_with_sigterm(tiny_cfg, "validate", 0, "SigtermAfterValidation")
    assert torch.load(last, weights_only=False)["global_step"] == 1


def test_sigterm_during_the_step0_validation_stops_before_training(tiny_cfg):
    assert not _run_with_sigterm(tiny_cfg, "validate", 0).exists()  # nothing trained, nothing to save


@pytest.mark.slow
def test_sigterm_during_a_validation_in_fit_saves_and_resumes_exactly(tmp_path, data_cache, tiny_cfg):
    # Lightning cuts the validation short (SIGTERMException); the training state of step 3 is saved, and the run
    # resumed from it ends with the weights of the run that was never stopped
    extra = [*TINY, *EXACT]
    straight = tmp_path / "straight"
    train.train(compose_config(extra, run_dir=straight, cache_dir=data_cache))

    stopped = tmp_path / "stopped"
    term = ["+callbacks.term._target_=tests.test_resume.SigtermAt", "+callbacks.term.fn=fit", "+callbacks.term.step=3"]
    assert math.isnan(train.train(compose_config([*extra, *term], run_dir=stopped, cache_dir=data_cache)))
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    train.train(compose_config([*extra, "ckpt_path=last"], run_dir=stopped, cache_dir=data_cache))
    assert_same_weights(weights(straight), weights(stopped))
    a, b = losses(straight), losses(stopped)
    assert a == b  # every training step, bitwise


def _train_cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    return [
        sys.executable,
        "train.py",
        *overrides,
        *EXACT[:1],
        "trainer.max_steps=40",
        "trainer.val_check_interval=4",
        "checkpoint.every_n_steps=2",
        "callbacks.samples=null",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


# train.py with every checkpoint write slowed down, so that a kill can land in the middle of one: torch.save sleeps
# after writing into the temporary file, before the atomic rename (fault injection kept out of the production code)
SLOW_CHECKPOINT_WRITES = """
import runpy, sys, time
import torch
save = torch.save
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(2)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_anytime_then_resume_reaches_the_same_weights(tmp_path, data_cache):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, data_cache), cwd=ROOT, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    # 1. killed while training, after a first checkpoint
    proc = subprocess.Popen(
        _train_cmd(killed, data_cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(last.exists, proc)
    # killed at once: on an idle machine the run would otherwise finish before the kill (nothing left to test)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2. killed in the middle of writing a checkpoint (the write is slowed down to hit it)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHECKPOINT_WRITES, *_train_cmd(killed, data_cache, "ckpt_path=last")[2:]],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: any(killed.glob("checkpoints/*.tmp-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    torch.load(last, weights_only=False)  # what is under the real name is complete
    # 3. resumed to the end
    subprocess.run(
        _train_cmd(killed, data_cache, "ckpt_path=last"), cwd=ROOT, check=True, capture_output=True, timeout=600
    )
    assert_same_weights(weights(straight), weights(killed))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = _train_cmd(run, data_cache, "trainer.max_steps=100000", "checkpoint.every_n_steps=null")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: any((run / "tensorboard").glob("events.*")) and (run / "tensorboard").stat().st_size >= 0, proc)
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM: saved" in out, out[-2000:]
    assert proc.returncode == 0 and json.loads((run / "status.json").read_text())["status"] == "stopped"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 < ckpt["global_step"] < 100000


def test_truncated_or_mismatched_checkpoint_is_refused(tmp_path, tiny_cfg, data_cache):
    cfg = tiny_cfg("trainer.max_steps=2", "callbacks.samples=null")
    train.train(cfg)
    good = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.ckpt: not a readable checkpoint"):
        train.train(compose_config([*TINY, f"ckpt_path={truncated}"], run_dir=tmp_path / "a", cache_dir=data_cache))

    with pytest.raises(UserError, match=r"another model \(dim: checkpoint 64 vs config 96"):
        train.train(
            compose_config([*TINY, "model.dim=96", f"ckpt_path={good}"], run_dir=tmp_path / "b", cache_dir=data_cache)
        )

    with pytest.raises(UserError, match="no checkpoint file"):
        train.train(
            compose_config([*TINY, f"ckpt_path={tmp_path}/nope.ckpt"], run_dir=tmp_path / "c", cache_dir=data_cache)
        )


def test_ckpt_path_last_without_checkpoint_starts_fresh(tiny_cfg, capsys):
    cfg = tiny_cfg("trainer.max_steps=1", "callbacks.samples=null", "ckpt_path=last")
    train.train(cfg)
    assert "no checkpoint at" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_with_compile_on_is_the_same_model(tiny_cfg):
    """`ckpt_path=last model.compile=true`: compilation changes how the model runs, not which model it is."""
    train.train(tiny_cfg("trainer.max_steps=2", "callbacks.samples=null"))
    resumed = tiny_cfg("trainer.max_steps=4", "callbacks.samples=null", "ckpt_path=last", "model.compile=true")
    assert math.isfinite(train.train(resumed))
    ckpt = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["model"]["compile"] is True


@pytest.mark.slow
def test_annealing_a_stable_phase_checkpoint_is_one_command(tmp_path, data_cache):
    """sched=wsd: the stable phase of a run continued by its decay alone, from a checkpoint, in a new run."""
    stable = [*TINY, "callbacks.samples=null", "sched=wsd", "sched.warmup_steps=0", "sched.decay_steps=0"]
    train.train(compose_config([*stable, "trainer.max_steps=4"], run_dir=tmp_path / "stable", cache_dir=data_cache))
    ckpt = tmp_path / "stable" / "checkpoints" / "last.ckpt"
    anneal = [*stable[:-1], "trainer.max_steps=8", "sched.decay_steps=4", f"ckpt_path={ckpt}"]
    train.train(compose_config(anneal, run_dir=tmp_path / "anneal", cache_dir=data_cache))

    acc = EventAccumulator(str(tmp_path / "anneal" / "tensorboard"))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("lr-AdamW/pg1")}
    peak = compose_config([]).optim.lr
    min_lr = compose_config(["sched=wsd"]).sched.min_lr
    # steps 4..7 decay linearly from the peak (progress 0, 1/4, 2/4, 3/4), reaching min_lr after the last step
    expected = [min_lr + (peak - min_lr) * (1 - i / 4) for i in range(4)]
    assert [lr[s] for s in range(4, 8)] == pytest.approx(expected, rel=1e-5)
    assert torch.load(tmp_path / "anneal" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


# ------------------------------------------------------------------------------------- every task resumes exactly

EXAMPLES = ROOT / "datamodules" / "corpora"
# each task on the first rows of its embedded set (train = val, no split): 10 examples in batches of 4 make
# epochs of 3 batches, the last one partial (4 + 4 + 2), so 8 steps cross two epoch ends; stopped after step 4 or 5
# (mid-epoch), resumed
TASKS = {
    "sft": (["experiment=finetune", "data.seq_len=256", "data.packing=false"], "austen_sft", 10),
    "sft-packed": (["experiment=finetune", "data.seq_len=256", "data.packing=true"], "austen_sft", 12),
    "classify": (["experiment=classify", "data.seq_len=64"], "austen_classify", 10),
    "dpo": (["experiment=dpo", "data.seq_len=256"], "austen_preference", 10),
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> Path:
    run = tmp_path_factory.mktemp("pretrain")
    train.train(compose_config([*TINY, "trainer.max_steps=2", "callbacks.samples=null"], run_dir=run,
                               cache_dir=data_cache))  # fmt: skip
    return run / "checkpoints" / "last.ckpt"


def first_rows(name: str, n: int, where: Path) -> Path:
    import gzip

    with gzip.open(EXAMPLES / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [next(f) for _ in range(n)]
    path = where / f"{name}-{n}.jsonl"
    path.write_text("".join(rows), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_stopped_mid_epoch_resumes_exactly(pretrained, tmp_path, task):
    overrides, name, n = TASKS[task]
    rows = first_rows(name, n, tmp_path)
    run = [o for o in TINY if not o.startswith(("model.", "data.", "callbacks.samples", "trainer.max_steps"))]
    extra = [
        *overrides,
        f"init_from={pretrained}",
        *run,
        "data.batch_size=4",
        f"data.paths=[{rows}]",
        f"data.val_paths=[{rows}]",
        "trainer.precision=32-true",
        "trainer.max_steps=8",
        "callbacks.samples=null",
    ]  # fmt: skip (TINY validates every 3 batches: once an epoch here)
    straight = tmp_path / "straight"
    train.train(compose_config(extra, run_dir=straight))
    batches = json.loads((straight / "data_report.json").read_text())["train"]
    per_epoch = -(-batches.get("rows", batches["examples"]) // 4)
    assert per_epoch == 3, batches  # the layout the test is about: 3 batches an epoch, the last partial

    resumed = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4"]
    train.train(compose_config([*extra, *stop], run_dir=resumed))
    stopped_at = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert stopped_at in (4, 5)  # the step after the request: mid-epoch (the second epoch is steps 4-6)
    train.train(compose_config([*extra, "ckpt_path=last"], run_dir=resumed))

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(8)) and a == b  # every training step, bitwise
    sa, sb = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for r in (straight, resumed)
    )
    assert_same_weights(sa, sb)  # the language model and, for classify, its head


# ------------------------------------------------------------------------------- SIGKILL of 2 processes, resumed

KILL_LAYOUTS = {
    "ddp": ["trainer=ddp", "trainer.devices=2", "data.batch_size=4"],
    "fsdp": ["trainer=fsdp", "trainer.devices=2", "data.batch_size=4"],
    "fsdp-async": ["trainer=fsdp", "trainer.devices=2", "data.batch_size=4", "checkpoint.async_save=true"],
}


def _two_process_cmd(run_dir: Path, cache: Path, layout: str, *extra: str) -> list[str]:
    from tests.test_distributed import BASE

    return [sys.executable, *extra, "train.py", *BASE, *KILL_LAYOUTS[layout], "trainer.max_steps=30",
            "trainer.val_check_interval=5", "checkpoint.every_n_steps=2", f"data.cache_dir={cache}",
            f"hydra.run.dir={run_dir}", "ckpt_path=last"]  # fmt: skip


def _saved_step(run_dir: Path) -> int:
    """The step of the checkpoint that `ckpt_path=last` would resume (-1: none), read as the next run reads it."""
    from llm.training.checkpoint import resolve_ckpt_path

    path = resolve_ckpt_path("last", run_dir)
    if path is None:
        return -1
    meta = Path(path) / "meta.pt" if Path(path).is_dir() else Path(path)
    try:
        return int(torch.load(meta, weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - replaced while being read: the next poll reads the new one
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(KILL_LAYOUTS))
def test_sigkill_of_both_processes_then_resume_reaches_the_same_weights(tmp_path, data_cache, layout):
    """The whole process group is killed three times at seeded moments (once in the middle of a checkpoint
    write), resumed each time; the end is the uninterrupted run's weights. Where each kill lands depends on
    the machine's speed; what is asserted does not."""
    import random

    from tests.test_distributed import final_weights

    straight = tmp_path / "straight"
    subprocess.run(_two_process_cmd(straight, data_cache, layout), cwd=ROOT, check=True, capture_output=True,
                   timeout=600)  # fmt: skip

    killed = tmp_path / "killed"
    rng = random.Random(17)
    kills = []
    for attempt in range(3):
        slow = attempt == 1  # this one is killed while a checkpoint is being written
        prefix = ["-c", SLOW_CHECKPOINT_WRITES] if slow else []
        cmd = _two_process_cmd(killed, data_cache, layout, *prefix)
        if slow:
            cmd.remove("train.py")  # SLOW_CHECKPOINT_WRITES runs train.py itself
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        target = _saved_step(killed) + 2 * rng.randint(1, 3)
        if slow:
            _wait_for(lambda: any(killed.glob("checkpoints/*.tmp*")), proc)
        else:
            _wait_for(lambda t=target: _saved_step(killed) >= t, proc)
            time.sleep(rng.uniform(0, 0.3))  # where the kill lands: varies; the assertion does not depend on it
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0, the rank it launched, and their workers
        proc.wait()
        kills.append(_saved_step(killed))
    print(f"{layout}: killed after the checkpoints of steps {kills}")
    assert _saved_step(killed) > 0  # a kill never leaves no checkpoint to resume

    subprocess.run(_two_process_cmd(killed, data_cache, layout), cwd=ROOT, check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
