"""optim=muon as a user runs it: DDP and FSDP2 in 2 CPU processes against one (FSDP resumed from its sharded
checkpoint), exact resume in one process, z-loss logged."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.test_distributed import final_weights, run
from tests.test_resume import EXACT, losses

pytestmark = pytest.mark.slow


class Float32Orthogonalisation(L.Callback):
    """Test helper: Muon's Newton-Schulz iteration in float32 instead of PyTorch's bfloat16, in every process.

    In bfloat16 a gradient summed in another order (2 processes against 1) sometimes rounds to the neighbouring
    bf16 value, and Muon's update of the whole matrix follows that rounding: after a few steps the runs differ by
    a few percent of how far the weights moved, by chance. In float32 only the order of the sums differs, so the
    comparison is as tight as AdamW's (tests/test_distributed.py). The iteration is PyTorch's, step for step.
    """

    def __init__(self) -> None:
        import torch.optim._muon as muon

        def float32(grad, ns_coefficients, ns_steps, eps):
            a, b, c = ns_coefficients
            x = grad.float()
            wide = grad.size(0) > grad.size(1)
            x = x.T if wide else x
            x = x / x.norm().clamp(min=eps)
            for _ in range(ns_steps):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            return x.T if wide else x

        muon._zeropower_via_newtonschulz = float32  # read by name at every step


MUON = ["optim=muon", "optim.lr=0.02", "optim.adamw_lr=3e-3"]
FP32_NS = ["+callbacks.ns._target_=tests.test_muon.Float32Orthogonalisation"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("muon-initial")  # shared initial weights (see tests/test_distributed.py)
    run(run_dir, data_cache, "trainer.max_steps=1", "optim.lr=0.0", "sched.min_lr=0.0")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache, initial) -> Path:
    run_dir = tmp_path_factory.mktemp("muon-single")
    run(run_dir, data_cache, *MUON, *FP32_NS, "data.batch_size=8", f"init_from={initial}")
    return run_dir


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_muon_in_two_processes_matches_one(single, initial, tmp_path, data_cache, trainer):
    run_dir = tmp_path / trainer
    two = [*MUON, *FP32_NS, f"trainer={trainer}", "trainer.devices=2", "data.batch_size=4", f"init_from={initial}"]
    if trainer == "fsdp":  # stopped at step 3 as a SIGTERM would, resumed with Muon's momentum from the shards
        run(run_dir, data_cache, *two, "+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=3")
        assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
        proc = run(run_dir, data_cache, *two, "ckpt_path=last")
        assert "Restored all states" in proc.stdout + proc.stderr
    else:
        run(run_dir, data_cache, *two)
    ref, got = losses(single, "val/loss"), losses(run_dir, "val/loss")
    assert set(ref) <= set(got) and len(ref) >= 2
    for step in ref:  # float32 throughout: only the order of the sums differs
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step
    a, b = final_weights(single), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
    moved = final_weights(single)["model.layers.0.attention.wq.weight"]
    start = torch.load(initial, weights_only=False)["state_dict"]["model.layers.0.attention.wq.weight"]
    assert (moved - start).abs().max() > 1e-2  # Muon moved the matrices far more than the tolerance


def test_muon_resume_is_exact_and_z_loss_is_logged(tmp_path, data_cache):
    extra = [*MUON, *EXACT, "optim.z_loss=1e-4", "trainer.log_every_n_steps=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, data_cache, *extra)
    run(resumed, data_cache, *extra, "+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4")
    run(resumed, data_cache, *extra, "ckpt_path=last")
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 8  # every step, bitwise
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    z = losses(straight, "train/z_loss")
    assert len(z) == 8 and all(v > 0 for v in z.values())
    assert losses(straight, "lr-MuonAdamW/muon")[0] > losses(straight, "lr-MuonAdamW/adamw_no_decay")[0]
