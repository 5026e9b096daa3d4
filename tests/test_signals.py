"""Signals in distributed runs (2 CPU processes, gloo): a signal that reaches one rank only stops every rank at the
same step with one checkpoint, which resumes exactly; a rank that dies ends the others with a clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_distributed import BASE, final_weights, run
from tests.test_resume import assert_same_weights, losses
from tests.test_slurm import STEPS, gate

pytestmark = pytest.mark.slow

TRAINERS = {"ddp": ["trainer=ddp", "trainer.devices=2"], "fsdp": ["trainer=fsdp", "trainer.devices=2"]}


def start(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *STEPS, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pattern: str, run_dir: Path, proc: subprocess.Popen, count: int = 2) -> list[Path]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(run_dir.glob(pattern))
        if len(found) >= count:
            return found
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {count} x {pattern} in {run_dir}:\n{proc.communicate()[0][-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> dict[str, Path]:
    """The references: each trainer's 12 steps, never stopped."""
    runs = {}
    for name, extra in TRAINERS.items():
        runs[name] = tmp_path_factory.mktemp(f"uninterrupted-{name}")
        run(runs[name], data_cache, *STEPS[len(BASE) :], *extra)
    return runs


# the rank that gets the signal: rank 0 (Lightning's launching process) or rank 1 (the process it started)
@pytest.mark.parametrize(("trainer", "sig", "rank"), [("ddp", "SIGUSR1", 0), ("fsdp", "SIGTERM", 1)])
def test_a_signal_to_one_rank_stops_all_at_one_step_and_resumes_exactly(
    uninterrupted, tmp_path, data_cache, trainer, sig, rank
):
    run_dir = tmp_path / "run"
    proc = start(run_dir, data_cache, *TRAINERS[trainer], *gate(4))
    try:
        waiting = wait_for("waiting-0-4.rank*", run_dir, proc)
        os.kill(int(waiting[rank].read_text()), getattr(signal, sig))  # that rank only
        wait_for(f"signalled-0-4.rank{rank}", run_dir, proc, count=1)  # noted there (after step 4, no agreement yet)
        (run_dir / "go-0-4").write_text("")  # the other rank goes on, knowing nothing
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert not (run_dir / f"signalled-0-4.rank{1 - rank}").exists()  # the other rank never got a signal
    # agreed at the next logging step (every 3): both ranks stopped after step 6 and saved one checkpoint of it
    assert out.count(f"{sig}: saved") == 1 and "at step 6; resume with ckpt_path=last" in out, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["signal"] == sig
    last = run_dir / "checkpoints" / "last.ckpt"
    meta = torch.load(last / "meta.pt" if last.is_dir() else last, map_location="cpu", weights_only=False)
    assert meta["global_step"] == 6

    resumed = run(run_dir, data_cache, *STEPS[len(BASE) :], *TRAINERS[trainer], "ckpt_path=last")
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert_same_weights(final_weights(uninterrupted[trainer]), final_weights(run_dir))
    ref, got = losses(uninterrupted[trainer], "val/loss"), losses(run_dir, "val/loss")
    assert {step: got[step] for step in ref} == ref  # (a stop validates once at its step, as Lightning does)


def test_a_rank_that_dies_ends_the_other_with_a_clear_line(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = start(run_dir, data_cache, *TRAINERS["ddp"], *gate(4))
    try:
        waiting = wait_for("waiting-0-4.rank*", run_dir, proc)
        proc.kill()  # rank 0, the launching process, dies; rank 1 waits after step 4, then trains on
        proc.wait(timeout=60)
        (run_dir / "go-0-4").write_text("")
        # the output ends when rank 1, which shares it, exits: within 2 minutes, far below the collective timeout
        # (30 minutes; gloo sees the closed socket at the next collective)
        out = proc.communicate(timeout=120)[0]
        deadline = time.monotonic() + 60  # the output closes as the process exits: let it finish exiting
        while _alive(int(waiting[1].read_text())) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        survivor = int(waiting[1].read_text()) if "waiting" in locals() else None
        if survivor is not None and _alive(survivor):
            os.kill(survivor, signal.SIGKILL)
    assert survivor is not None and not _alive(survivor)
    assert "error: rank 1: another process of this run is gone" in out, out[-3000:]
    assert "resume with ckpt_path=last" in out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended (nobody may reap it in a container)
