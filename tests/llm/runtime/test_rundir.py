"""A run directory that cannot be written is refused in one line, before Hydra or the data touch anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm.runtime.rundir import unwritable

ROOT = Path(__file__).resolve().parents[3]


def train(*overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    flags = ["-m"] if multirun else []
    return subprocess.run([sys.executable, "train.py", *flags, "trainer.max_steps=1", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_writable_directory_is_created_and_left_empty(tmp_path):
    assert unwritable(tmp_path / "a" / "b") is None
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_a_directory_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    run_dir = tmp_path / "file" / "run"
    proc = train(f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: the run directory {run_dir} cannot be written (Not a directory); choose another with hydra.run.dir=..."
    ]
    sweep = train(f"hydra.sweep.dir={run_dir}", "seed=1,2", multirun=True)
    assert sweep.returncode == 2 and "choose another with hydra.sweep.dir=..." in sweep.stderr
    assert "Traceback" not in sweep.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only bind mount of an empty directory: root ignores file modes, not a read-only mount."""
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    for cmd in (["mount", "--bind", str(src), str(mnt)], ["mount", "-o", "remount,bind,ro", str(mnt)]):
        try:
            ok = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
        except (FileNotFoundError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
            pytest.skip("cannot make a read-only bind mount here (needs root and mount): " + " ".join(cmd))
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_a_read_only_run_directory_is_refused_before_anything_is_written(read_only_dir):
    run_dir = read_only_dir / "run"
    proc = train(f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: the run directory {run_dir} cannot be written (Read-only file system); "
        "choose another with hydra.run.dir=..."
    ]
    assert not run_dir.exists()
