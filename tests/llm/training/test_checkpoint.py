"""Atomic checkpoint writes: complete or absent, and a full disk reported with the old checkpoint kept."""

from __future__ import annotations

import errno

import pytest
import torch

from llm.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from tests.conftest import debug_model


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


def _resumable(path, model: dict) -> str:
    torch.save({"state_dict": {}, "hyper_parameters": {"model": model}, "loops": {}}, path)
    return str(path)


def test_same_model_means_same_shapes_only(tmp_path):
    """Dropout, compilation and context length may change on resume; a shape key may not."""
    from llm.errors import UserError
    from llm.training.checkpoint import check_resume

    saved = debug_model()
    path = _resumable(tmp_path / "last.ckpt", saved.to_dict())
    check_resume(path, debug_model(compile=True, dropout=0.1))
    check_resume(path, debug_model(max_seq_len=4096))
    with pytest.raises(UserError, match=r"another model \(n_layers: checkpoint 2 vs config 3\)"):
        check_resume(path, debug_model(n_layers=3))
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": saved.to_dict()}}, weights_only)
    with pytest.raises(UserError, match="holds weights only"):
        check_resume(str(weights_only), saved)
