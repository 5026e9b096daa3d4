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


# ------------------------------------------------------------------ resuming on another world size (issue 17)


def _trained_with_two_groups() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose optimizer lists its parameters in another order than the module (as configure_optimizers
    does: matrices first), after one AdamW step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    groups = [{"params": [model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].weight, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    model[2](model[1](model[0](torch.tensor([1, 2, 3])))).square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_gathered_is_what_a_plain_optimizer_loads(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from llm.training.checkpoint import by_name, load_whole

    model, optimizer = _trained_with_two_groups()
    directory = tmp_path / "last.ckpt"
    saved = {"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, optimizer)}
    dcp.save(saved, checkpoint_id=directory, no_dist=True)  # the layout FSDP2Strategy writes (keyed by name)
    torch.save({"global_step": 1, "loops": {"x": 1}, "lr_schedulers": []}, directory / "meta.pt")

    ckpt = load_whole(directory)
    assert ckpt["global_step"] == 1 and ckpt["loops"] == {"x": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v)
    fresh = torch.optim.AdamW([{"params": g["params"]} for g in optimizer.param_groups], lr=0.5)
    fresh.load_state_dict(ckpt["optimizer_states"][0])  # keyed by index, group after group
    expected, got = optimizer.state_dict(), fresh.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    for i, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][i][key], value), (i, key)

    # and back: an index-keyed state (a DDP checkpoint) named in the optimizer's order, for FSDP's loader
    names = [n for g in saved["optimizer_0"]["param_groups"] for n in g["params"]]
    back = by_name(expected, names, "x.ckpt")
    assert back["param_groups"] == saved["optimizer_0"]["param_groups"]
    assert torch.equal(back["state"]["2.weight"]["exp_avg"], saved["optimizer_0"]["state"]["2.weight"]["exp_avg"])


def test_gathering_a_sharded_checkpoint_runs_no_code_from_it(tmp_path):
    from llm.errors import UserError
    from llm.training.checkpoint import load_whole
    from tests.llm.training.test_safe_load import evil, sharded

    marker = tmp_path / "ran"
    directory = sharded(tmp_path / "sharded", extra=evil(marker))
    with pytest.raises(UserError, match="refused: reading it would call"):
        load_whole(directory)
    assert not marker.exists()


def test_swap_in_replaces_a_directory_by_a_file_and_back_and_a_kill_between_leaves_old(tmp_path, capsys):
    from llm.training.checkpoint import resolve_ckpt_path, swap_in

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"step": 1}, last)
    sharded = tmp_path / "checkpoints" / "last.ckpt.tmp"
    sharded.mkdir()
    for name in (".metadata", "meta.pt"):
        (sharded / name).write_bytes(b"x")
    swap_in(sharded, last)  # a directory over a file (an FSDP run resuming a single-device one)
    assert last.is_dir() and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    single = tmp_path / "checkpoints" / "last.ckpt.tmp-1"
    torch.save({"step": 2}, single)
    swap_in(single, last)  # a file over a directory
    assert torch.load(last)["step"] == 2 and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]

    # killed between the two renames: only last.ckpt.old is there, and it is what `last` resumes
    last.rename(tmp_path / "checkpoints" / "last.ckpt.old")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt.old")
    assert "resuming from" in capsys.readouterr().out
    torch.save({"step": 3}, single)
    swap_in(single, last)  # the next save: the new one in place, then the old one gone
    assert torch.load(last)["step"] == 3 and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def _progress(ready: int, completed: int) -> dict:
    counts = {"ready": ready, "started": ready, "processed": ready, "completed": completed}
    return {"total": dict(counts), "current": dict(counts), "is_last_batch": False}


def test_batch_counts_follow_the_samples_when_the_batch_over_all_ranks_changes():
    from datamodules.order import ResumableOrder
    from llm.errors import UserError

    class Order(ResumableOrder):  # the mixin's host: a data module of one process with batches of 4
        batch_size, seed = 4, 0

    # saved by 2 processes x 4 windows after 3 batches (24 windows), the third still "in flight" (completed 2)
    key = Order.__qualname__  # the data module's entry is named after its class, as Lightning names it
    ckpt = {key: {"epoch": 0, "position": 24, "batch_samples": 8}, "loops": {"fit_loop": {}}}
    ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"] = _progress(3, 2)
    Order().adapt_checkpoint(ckpt)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"] == _progress(6, 5)  # 6 batches of 4 windows

    del ckpt[key]["batch_samples"]  # an older checkpoint: the batch is position / batches
    ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"] = _progress(3, 2)
    Order().adapt_checkpoint(ckpt)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"] == _progress(6, 5)

    class Threes(Order):
        batch_size = 3

    ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"] = _progress(4, 3)  # 32 windows
    ckpt[Threes.__qualname__] = {"epoch": 0, "position": 32, "batch_samples": 8}
    with pytest.raises(UserError, match="32 samples into the epoch, which is not a whole number"):
        Threes().adapt_checkpoint(ckpt, "step4.ckpt")
