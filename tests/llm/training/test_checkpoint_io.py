"""Asynchronous checkpoints keep the atomic guarantees; a full disk or a read-only directory is one line."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train
from llm.training.checkpoint_io import AsyncCheckpointIO, AtomicCheckpointIO, CheckpointWriteError
from tests.conftest import ROOT, TINY, compose_config


class Gate:
    """Test helper: pickled inside a checkpoint, holds the writer thread mid-write until ``release``d."""

    entered = threading.Event()
    release = threading.Event()

    def __reduce__(self):
        Gate.entered.set()
        assert Gate.release.wait(timeout=60)
        return (int, (0,))


@pytest.fixture
def gate():
    Gate.entered.clear()
    Gate.release.clear()
    yield Gate
    Gate.release.set()


def test_async_writes_the_state_of_the_moment_it_was_asked(tmp_path):
    io = AsyncCheckpointIO()
    weights = torch.arange(5.0)
    io.save_checkpoint({"w": weights, "step": 1}, tmp_path / "last.ckpt")
    weights.add_(100)  # the next optimizer step, while the thread may still be writing
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_async_removal_waits_for_the_write_before_it(tmp_path, gate):
    io = AsyncCheckpointIO()
    path = tmp_path / "best-step3.ckpt"
    io.save_checkpoint({"gate": Gate()}, path)
    assert gate.entered.wait(timeout=60)  # the writer is inside this very write
    io.remove_checkpoint(path)  # a ModelCheckpoint replacing its best: must not overtake the write
    gate.release.set()
    io.teardown()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_async_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    io = AsyncCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.wait()

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    io.save_checkpoint({"step": 2}, path)  # returns at once: the thread fails later
    with pytest.raises(
        CheckpointWriteError, match=r"could not write checkpoint .*last.ckpt: the disk is full; the prev"
    ):
        io.teardown()
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    io.teardown()  # reported once: Lightning tears down again after an error


KILLED_MID_WRITE = """
import sys, threading, torch
from llm.training.checkpoint_io import AsyncCheckpointIO, AtomicCheckpointIO

class Stall:  # pickled by the writer thread: the temporary file is open, the new state half-serialised
    def __reduce__(self):
        print("writing", flush=True)
        threading.Event().wait()

path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
io = AsyncCheckpointIO()
io.save_checkpoint({"step": 2, "w": torch.zeros(1_000_000), "z": Stall()}, path)
threading.Event().wait()  # training would go on here
"""


def test_a_kill_during_an_async_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == "writing"  # the writer thread is mid-file
        partial = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
        assert len(partial) == 1 and partial[0].name.startswith("last.ckpt.tmp-")
    finally:
        child.kill()
        child.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


# ------------------------------------------------------------------------------ a real full disk, read-only


def _mount_tmpfs(target: Path, options: str) -> bool:
    """A small tmpfs (root in a container may mount one); False where this machine does not allow it."""
    if shutil.which("mount") is None:
        return False
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB filesystem: the real ENOSPC from the kernel, not a patched function."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root in a container); the patched-ENOSPC test covers the path")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("io", [AtomicCheckpointIO, AsyncCheckpointIO], ids=["sync", "async"])
def test_a_really_full_disk_keeps_the_previous_checkpoint(tiny_disk, io):
    plugin = io()
    path = tiny_disk / "checkpoints" / "last.ckpt"
    plugin.save_checkpoint({"step": 1, "w": torch.ones(10_000)}, path)  # 40 kB: fits
    plugin.teardown()
    with pytest.raises(CheckpointWriteError, match=r"last.ckpt: the disk is full; the previous one is kept"):
        plugin.save_checkpoint({"step": 2, "w": torch.ones(1_000_000)}, path)  # 4 MB: does not
        plugin.teardown()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(10_000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------- in training


@pytest.mark.slow
def test_a_run_with_async_checkpoints_saves_and_resumes(tmp_path, data_cache):
    run = [*TINY, "checkpoint.async_save=true", "callbacks.samples=null", "trainer.precision=32-true"]
    train.train(compose_config(run, run_dir=tmp_path / "async", cache_dir=data_cache))
    ckpts = tmp_path / "async" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6
    assert sorted(p.name for p in ckpts.iterdir() if ".tmp-" in p.name) == []
    more = [*run, "trainer.max_steps=9", "ckpt_path=last"]  # every write landed whole: the run resumes from it
    train.train(compose_config(more, run_dir=tmp_path / "async", cache_dir=data_cache))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 9
