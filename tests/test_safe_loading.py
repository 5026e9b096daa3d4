"""Issue 20 as a user meets it: a checkpoint whose pickle calls os.system, given to every entry point that reads
checkpoints. The command never runs (its side effect, a file, is checked), the answer is one line, exit code 2."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import checkpoints, convert, generate
from llm.training import safe_load
from tests.conftest import ROOT, TINY
from tests.llm.training.test_safe_load import evil, plain_checkpoint, sharded


@pytest.fixture(autouse=True)
def safe_by_default():
    safe_load.allow_unsafe(False)
    yield
    safe_load.allow_unsafe(False)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "the-command-ran"


@pytest.fixture
def evil_ckpt(tmp_path, marker) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save({**plain_checkpoint(), "callbacks": {"x": evil(marker)}}, path)
    return path


def refused(rc: int, err: str, marker: Path) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "refused: reading it would call" in lines[0] and "system" in lines[0]
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("how", ["init_from", "ckpt_path", "sharded ckpt_path"])
def test_train_refuses_it(tmp_path, evil_ckpt, marker, data_cache, how):
    if how == "sharded ckpt_path":  # an FSDP checkpoint directory whose DCP .metadata is the malicious pickle
        evil_ckpt = sharded(tmp_path / "sharded")
        (evil_ckpt / ".metadata").write_bytes(pickle.dumps(evil(marker)))
        how = "ckpt_path"
    run = [o for o in TINY if not o.startswith(("model.", "data."))]  # finetune takes the model from init_from
    args = (
        ["experiment=finetune", f"init_from={evil_ckpt}", *run]
        if how == "init_from"
        else [*TINY, f"ckpt_path={evil_ckpt}", f"data.cache_dir={data_cache}"]
    )
    proc = subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    refused(proc.returncode, proc.stderr, marker)


def test_generate_convert_and_consolidate_refuse_it(tmp_path, evil_ckpt, marker, capsys):
    for main, argv in [
        (generate.main, [f"ckpt_path={evil_ckpt}", "prompt=hi"]),
        (convert.main, ["to-hf", str(evil_ckpt), str(tmp_path / "hf")]),
        (convert.main, ["merge", str(evil_ckpt), str(tmp_path / "merged.ckpt")]),
    ]:
        rc = main(argv)
        refused(rc, capsys.readouterr().err, marker)
    for where in ("meta", "shard"):
        directory = sharded(
            tmp_path / where, **({"meta_extra": evil(marker)} if where == "meta" else {"extra": evil(marker)})
        )
        rc = checkpoints.main(["consolidate", str(directory), str(tmp_path / "out.ckpt")])
        refused(rc, capsys.readouterr().err, marker)
        assert not (tmp_path / "out.ckpt").exists()

    # the explicit way back runs it (and says so): the switch is real
    assert generate.main([f"ckpt_path={evil_ckpt}", "prompt=hi", "allow_unsafe_checkpoint=true"]) == 2
    assert marker.exists()
    assert generate.main([f"ckpt_path={evil_ckpt}", "allow_unsafe_checkpoint=maybe"]) == 2
    assert "allow_unsafe_checkpoint='maybe' must be true or false" in capsys.readouterr().err


def test_hugging_face_pickled_weights_are_refused(tmp_path, marker, capsys, chat_checkpoint):
    hf = convert.to_hf(chat_checkpoint, tmp_path / "hf")  # a real model directory, then its weights as a pickle
    for f in hf.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"x": evil(marker)}, hf / "pytorch_model.bin")
    assert convert.main(["from-hf", str(hf), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "only PyTorch .bin weights; re-save the model with safetensors" in err and not marker.exists()
    shutil.rmtree(hf)


def test_the_commands_that_use_a_model_refuse_it(tmp_path, evil_ckpt, marker, capsys):
    from llm.human_eval.__main__ import main as human_eval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Who is Emma?", "response": "A heroine."}\n', encoding="utf-8")
    study = ["new", str(tmp_path / "study"), "--a", str(evil_ckpt), "--b", "references", "--prompts", str(prompts)]
    refused(human_eval(study), capsys.readouterr().err, marker)
    from llm import chat, serve

    refused(serve.main([f"ckpt_path={evil_ckpt}", "port=0"]), capsys.readouterr().err, marker)
    refused(chat.main([f"ckpt_path={evil_ckpt}"]), capsys.readouterr().err, marker)
    from llm import inspect

    refused(inspect.main(["neighbours", f"ckpt_path={evil_ckpt}", "word=Darcy"]), capsys.readouterr().err, marker)
