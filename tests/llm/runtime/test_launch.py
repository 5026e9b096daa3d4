"""Run-directory naming: every process of a run, started by whatever launcher, agrees on one directory; and the
end of a job in a process that did not launch it."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from llm.runtime import launch
from llm.runtime.launch import run_stamp

LAUNCHERS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCHERS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_own_launch_names_the_directory_by_the_clock(no_launcher):
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", run_stamp())


def test_torchrun_processes_share_the_run_id(no_launcher):
    no_launcher.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert run_stamp() == "torchrun-abc123"


def test_slurm_job_keeps_its_id_across_a_requeue(no_launcher):
    no_launcher.setenv("SLURM_JOB_ID", "4242")
    assert run_stamp() == "slurm-4242"


def test_torchrun_without_a_run_id_falls_through(no_launcher):
    no_launcher.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's value when no --rdzv-id was given
    no_launcher.setenv("SLURM_JOB_ID", "7")
    assert run_stamp() == "slurm-7"


@pytest.fixture
def started_child(monkeypatch, tmp_path):
    """This process as one Lightning (or torchrun) started: LOCAL_RANK set, a Gloo group of its own."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_started_process_destroys_its_group_when_its_job_succeeds(started_child):
    # left to the interpreter's exit, Gloo's threads now and then abort a process after a good run (-6 in CI)
    with launch.job_scope():
        dist.all_reduce(torch.ones(1))
    assert not dist.is_initialized()


def test_a_started_process_keeps_its_group_when_its_job_fails(started_child):
    # a peer may still wait in a collective with it: destroying could hang; the failure is what matters
    with pytest.raises(ValueError, match="job failed"):
        with launch.job_scope():
            raise ValueError("job failed")
    assert dist.is_initialized()
