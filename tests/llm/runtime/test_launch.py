"""Run-directory naming: every process of a run, started by whatever launcher, agrees on one directory."""

from __future__ import annotations

import re

import pytest

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
