"""Checkpoints are read as data: a pickle that would run code is refused in one line, in a file, in a sharded
directory's meta.pt, in its .metadata and in a non-tensor entry of its shards; allow_unsafe is the only way back."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from llm.errors import UserError
from llm.training import checkpoint, safe_load


class RunsCommand:
    """Unpickling this calls os.system(command): what a malicious checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def evil(marker: Path) -> RunsCommand:
    return RunsCommand(f"touch {marker}")


@pytest.fixture(autouse=True)
def safe_by_default():
    safe_load.allow_unsafe(False)
    yield
    safe_load.allow_unsafe(False)


def plain_checkpoint() -> dict:
    state = {"model.tok_embeddings.weight": torch.randn(8, 4), "model.norm.weight": torch.ones(4)}
    return {"state_dict": state, "hyper_parameters": {"model": {"dim": 4}}, "tokenizer": "{}", "loops": {"x": 1}}


def sharded(directory: Path, extra: object | None = None, meta_extra: object | None = None) -> Path:
    """A sharded checkpoint directory as FSDP writes it (DCP shards + .metadata, Lightning's meta.pt)."""
    ckpt = plain_checkpoint()
    state = {"state_dict": ckpt.pop("state_dict")}
    if extra is not None:
        state["optimizer_0"] = {"param_groups": [{"lr": 0.1, "note": extra}]}  # a non-tensor ("bytes") entry
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({**ckpt, **({} if meta_extra is None else {"x": meta_extra})}, directory / "meta.pt")
    return directory


def test_a_file_that_would_run_code_is_refused_naming_what_it_asked_for(tmp_path):
    marker = tmp_path / "ran"
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    torch.save(plain_checkpoint(), good)
    torch.save({**plain_checkpoint(), "x": evil(marker)}, bad)
    assert checkpoint.load(good)["loops"] == {"x": 1}
    with pytest.raises(UserError) as err:
        checkpoint.load(bad)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "system" in message and "allow_unsafe_checkpoint" in message
    assert not marker.exists()

    safe_load.allow_unsafe(True)  # the explicit way back: plain pickle, which does run it
    checkpoint.load(bad)
    assert marker.exists()


@pytest.mark.parametrize("where", ["meta.pt", ".metadata", "shard entry"])
def test_a_sharded_directory_is_checked_before_dcp_unpickles_it(tmp_path, where):
    marker = tmp_path / "ran"
    good = sharded(tmp_path / "good")
    safe_load.check_sharded(good)
    assert checkpoint.consolidate(good)["state_dict"]["model.norm.weight"].tolist() == [1.0] * 4

    bad = sharded(tmp_path / "bad", extra=evil(marker) if where == "shard entry" else None,
                  meta_extra=evil(marker) if where == "meta.pt" else None)  # fmt: skip
    if where == ".metadata":  # DCP's own file, which torch reads with plain pickle.load
        (bad / ".metadata").write_bytes(pickle.dumps(evil(marker)))
    for read in (safe_load.check_sharded, checkpoint.consolidate, checkpoint.load_meta):
        with pytest.raises(UserError, match="refused: reading it would call") as err:
            read(bad)
        assert "\n" not in str(err.value) and "system" in str(err.value)
    assert not marker.exists()

    safe_load.allow_unsafe(True)  # the danger is real: without the check, PyTorch's own readers run it
    try:
        checkpoint.consolidate(bad)
    except (Exception, CheckpointException):  # what the command returned is no checkpoint; that it ran is the point
        pass
    assert marker.exists()


def test_sharded_metadata_cannot_point_outside_its_directory(tmp_path):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    bad = sharded(tmp_path / "bad", extra="plain text")
    meta = safe_load.read_dcp_metadata(bad)
    key = next(k for k in meta.storage_data if isinstance(k, MetadataIndex) and "note" in k.fqn)
    meta.storage_data[key].relative_path = "../../elsewhere.distcp"
    (bad / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError, match="points outside the directory"):
        safe_load.check_sharded(bad)
