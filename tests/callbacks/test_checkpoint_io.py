"""Atomic checkpoint writes: complete or absent, and a full disk reported with the old checkpoint kept."""

from __future__ import annotations

import errno

import pytest
import torch

from callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError


def test_writes_complete_file_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(5)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "Permission denied")])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, code, words):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError(code, __import__("os").strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint .*last.ckpt: {words}"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
