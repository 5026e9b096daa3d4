"""LoRA runs as a user types them: finetune and classify with adapter=lora, exact resume, refusals, DDP and FSDP2
in 2 CPU processes against one, torch.compile; QLoRA refused without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from llm.core import lora
from llm.errors import UserError
from tests.conftest import TINY, compose_config
from tests.test_distributed import BASE, run
from tests.test_resume import EXACT, assert_same_weights, losses

pytestmark = pytest.mark.slow

RUN = [o for o in TINY if not o.startswith(("model.", "data."))]
SFT = ["experiment=finetune", "adapter=lora", "adapter.rank=4", "data.seq_len=200", "data.batch_size=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("base")
    train.train(compose_config(TINY, run_dir=run_dir, cache_dir=data_cache))
    return run_dir / "checkpoints" / "last.ckpt"


def finetune(run_dir: Path, base: Path, *extra: str) -> float:
    return train.train(compose_config([*SFT, f"init_from={base}", *RUN, "optim.lr=3e-2", *extra], run_dir=run_dir))


def saved(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_finetune_with_lora_saves_adapters_only_and_evaluates_as_a_whole_model(base, tmp_path):
    ft = tmp_path / "ft"
    val_loss = finetune(ft, base)
    last = ft / "checkpoints" / "last.ckpt"
    ckpt = saved(last)
    assert all(lora.is_adapter_key(k) for k in ckpt["state_dict"]) and ckpt["state_dict"]
    assert ckpt["adapter"]["base"]["path"] == str(base.resolve()) and len(ckpt["adapter"]["base"]["sha256"]) == 64
    assert any(v.abs().sum() > 0 for k, v in ckpt["state_dict"].items() if k.endswith("lora_b"))  # it trained
    # small: no base weights, and optimizer state for the adapters only
    assert last.stat().st_size < 0.5 * base.stat().st_size
    base_state = saved(base)["state_dict"]
    n_adapter = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_adapter < 0.1 * sum(v.numel() for k, v in base_state.items() if k.startswith("model."))

    # the checkpoint alone (its base found by path) is a model: evaluating it gives the run's final val/loss
    ev = tmp_path / "eval"
    best = sorted((ft / "checkpoints").glob("best-*.ckpt"))[-1]
    loss = train.train(compose_config(
        ["experiment=eval", f"init_from={best}", "data=sft", "data.seq_len=200", "data.batch_size=4",
         "trainer.accelerator=cpu", "trainer.limit_val_batches=2", "experiment.max_samples=0"], run_dir=ev))  # fmt: skip
    assert loss == pytest.approx(val_loss, rel=1e-5)
    assert json.loads((ev / "eval.json").read_text())["metrics"]["loss"] == pytest.approx(val_loss, rel=1e-5)


def test_lora_resume_is_exact_and_refuses_another_base(base, tmp_path, data_cache):
    exact = [*EXACT, "trainer.limit_val_batches=1"]
    straight = tmp_path / "straight"
    finetune(straight, base, *exact)
    resumed = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4"]
    finetune(resumed, base, *exact, *stop)
    finetune(resumed, base, *exact, "ckpt_path=last")
    assert losses(straight) == losses(resumed)  # every step, bitwise
    a, b = (saved(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (straight, resumed))
    assert_same_weights(a, b)

    other = tmp_path / "other.ckpt"  # another base: the same model, one weight changed
    ckpt = saved(base)
    ckpt["state_dict"]["model.norm.weight"] = ckpt["state_dict"]["model.norm.weight"] + 1
    torch.save(ckpt, other)
    with pytest.raises(UserError, match="its adapters were trained on .* resume with the base they were trained on"):
        finetune(resumed, other, *exact, "trainer.max_steps=10", "ckpt_path=last")
    with pytest.raises(UserError, match="holds LoRA adapters; resume it with the same adapter="):
        train.train(compose_config(
            ["experiment=finetune", f"init_from={base}", *RUN, "data.seq_len=200", "data.batch_size=4",
             "ckpt_path=last", "trainer.max_steps=10"], run_dir=resumed))  # fmt: skip


def test_classify_with_lora_trains_head_and_adapters(base, tmp_path):
    run_dir = tmp_path / "cls"
    extra = [o for o in RUN if not o.startswith("callbacks.samples")]
    train.train(compose_config(
        ["experiment=classify", "adapter=lora", f"init_from={base}", *extra, "data.seq_len=64"], run_dir=run_dir))  # fmt: skip
    keys = set(saved(run_dir / "checkpoints" / "last.ckpt")["state_dict"])
    assert {"head.weight", "head.bias"} <= keys and all(k.startswith("head.") or lora.is_adapter_key(k) for k in keys)


def test_lora_with_compile(base, tmp_path):
    loss = finetune(tmp_path / "compiled", base, "model.compile=true", "trainer.max_steps=2", "trainer.limit_val_batches=1")
    assert 0 < loss < 10


def test_qlora_is_refused_without_cuda_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match="adapter=qlora .* needs a CUDA GPU") as err:
        train.train(compose_config(["experiment=finetune", "adapter=qlora", "init_from=/nonexistent.ckpt", *RUN],
                                   run_dir=tmp_path))  # fmt: skip
    assert "\n" not in str(err.value)


def test_adapters_need_init_from_and_eval_takes_none(tmp_path):
    with pytest.raises(UserError, match="adapter=lora trains adapters on frozen weights: give them as init_from"):
        train.train(compose_config(["adapter=lora", *TINY], run_dir=tmp_path))
    with pytest.raises(UserError, match="experiment=eval measures init_from as it is"):
        train.train(compose_config(["experiment=eval", "adapter=lora", "init_from=x.ckpt", *RUN], run_dir=tmp_path))


# ------------------------------------------------------------------------------------- 2 processes against one


@pytest.fixture(scope="module")
def initial(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("lora-initial")
    run(run_dir, data_cache, "trainer.max_steps=1", "optim.lr=0.0", "sched.min_lr=0.0")
    return run_dir / "checkpoints" / "last.ckpt"


# no adapter dropout: each process draws its own masks, so with dropout 2 processes cannot equal one
LORA = ["adapter=lora", "adapter.rank=4", "adapter.dropout=0"]


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory, data_cache, initial) -> Path:
    run_dir = tmp_path_factory.mktemp("lora-single")
    run(run_dir, data_cache, *LORA, "data.batch_size=8", f"init_from={initial}")
    return run_dir


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_lora_in_two_processes_matches_one(single_lora, initial, tmp_path, data_cache, trainer):
    run_dir = tmp_path / trainer
    two = [*LORA, f"trainer={trainer}", "trainer.devices=2", "data.batch_size=4", f"init_from={initial}"]
    if trainer == "fsdp":  # stopped at step 3 as a SIGTERM would, resumed from its sharded adapter checkpoint
        run(run_dir, data_cache, *two, "+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=3")
        assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
        proc = run(run_dir, data_cache, *two, "ckpt_path=last")
        assert "Restored all states" in proc.stdout + proc.stderr
    else:
        run(run_dir, data_cache, *two)
    ref, got = losses(single_lora, "val/loss"), losses(run_dir, "val/loss")
    assert set(ref) <= set(got) and len(ref) >= 2  # (a stopped run may log one more validation)
    for step in ref:  # float32: only the order of the sums differs (see tests/test_distributed.py)
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():
        from llm.checkpoints import consolidate

        got_state = consolidate(last)["state_dict"]
    else:
        got_state = saved(last)["state_dict"]
    want = saved(single_lora / "checkpoints" / "last.ckpt")["state_dict"]
    got_state = {k: v for k, v in got_state.items() if k in want}
    assert want.keys() == got_state.keys() and all(lora.is_adapter_key(k) for k in want)
    for k in want:
        torch.testing.assert_close(got_state[k], want[k], atol=1e-4, rtol=1e-3)
    assert all(want[k].abs().max() > 1e-3 for k in want if k.endswith("lora_b"))  # they trained
    assert "trainer.precision=32-true" in BASE
