"""finetune / classify / eval end to end through Hydra's compose API (pretrain first), and their user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer

import train
from datamodules.sources import DataError
from datamodules.tokenizer import train_tokenizer
from llm.app.init_from import merge_model
from llm.errors import UserError
from tests.conftest import ROOT, TINY, compose_config, debug_model

RUN = [o for o in TINY if not o.startswith(("model.", "data."))]  # trainer, sched and callbacks settings
RUN_CLS = [o for o in RUN if not o.startswith("callbacks.samples")]  # a classifier writes no text samples
TITLES = ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice", "Sense and Sensibility"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> Path:
    """A few steps of pretraining of the tiny test model: the checkpoint the other experiments start from."""
    run = tmp_path_factory.mktemp("pretrain")
    train.train(compose_config(TINY, run_dir=run, cache_dir=data_cache))
    return run / "checkpoints" / "last.ckpt"


def run_experiment(overrides: list[str], run_dir: Path, data_cache: Path | None = None) -> float:
    return train.train(compose_config(overrides, run_dir=run_dir, cache_dir=data_cache))


def tb(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_finetune_then_eval(pretrained, tmp_path):
    ft = tmp_path / "finetune"
    run_experiment(
        ["experiment=finetune", f"init_from={pretrained}", *RUN, "data.seq_len=200", "data.batch_size=4"], ft
    )
    ckpt = torch.load(ft / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["chat_format"] == "<|{role}|>\n{content}\n" and "{% for message in messages %}" in ckpt["chat_template"]
    assert ckpt["tokenizer"] == torch.load(pretrained, map_location="cpu", weights_only=False)["tokenizer"]
    assert ckpt["hyper_parameters"]["model"]["dim"] == 64  # the pretrained shape, not model=tiny's
    assert json.loads((ft / "data_report.json").read_text())["kind"] == "sft"

    # exported, Hugging Face's apply_chat_template gives the prompt tokens the model was finetuned on
    transformers = pytest.importorskip("transformers")
    from datamodules.sft import ChatTemplate, encode_conversations
    from llm.convert import to_hf

    hf_dir = to_hf(ft / "checkpoints" / "last.ckpt", tmp_path / "hf")
    messages = [{"role": "user", "content": "Which novel is this from?\n\nEmma was sad."}]
    hf_ids = transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    ids, _, start = encode_conversations(
        tokenizer, ChatTemplate(), [[*messages, {"role": "assistant", "content": "x"}]], 0, 1
    )[0]
    assert hf_ids == ids[:start].tolist()

    ev = tmp_path / "eval"
    loss = run_experiment(
        ["experiment=eval", f"init_from={ft / 'checkpoints' / 'last.ckpt'}", "data=sft", "data.seq_len=200",
         "experiment.max_samples=3", "experiment.max_new_tokens=4", "trainer.accelerator=cpu"],
        ev,
    )  # fmt: skip
    result = json.loads((ev / "eval.json").read_text())
    m = result["metrics"]
    assert result["kind"] == "sft" and loss == pytest.approx(m["loss"])
    assert {"loss", "perplexity", "accuracy", "bleu", "rouge_l", "exact_match"} <= set(m) and m["generated"] == 3
    samples = [json.loads(line) for line in (ev / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["prompt"].endswith("<|assistant|>\n") and s["reference"] for s in samples)
    assert "eval/rouge_l" in tb(ev).Tags()["scalars"]
    assert not (ev / "checkpoints").exists()  # no training


@pytest.mark.slow
def test_classify_then_eval(pretrained, tmp_path):
    cls = tmp_path / "classify"
    run_experiment(
        ["experiment=classify", f"init_from={pretrained}", *RUN_CLS, "data.seq_len=64", "data.batch_size=8"], cls
    )
    ckpt = torch.load(cls / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["labels"] == TITLES
    assert ckpt["hyper_parameters"]["label_smoothing"] == 0.1
    tags = tb(cls).Tags()
    assert {"val/acc", "val/f1", "val/loss", "train/loss"} <= set(tags["scalars"])
    assert "val/confusion" in tags["images"]

    # a user's file, given as data.paths alone: evaluated whole
    rows = [{"text": f"Elizabeth and Mr. Darcy, line {i}.", "label": TITLES[i % 6]} for i in range(12)]
    src = write_jsonl(tmp_path / "test.jsonl", rows)
    ev = tmp_path / "eval"
    ckpt_path = cls / "checkpoints" / "last.ckpt"
    run_experiment(["experiment=eval", f"init_from={ckpt_path}", "data=classify", f"data.paths=[{src}]"], ev)
    result = json.loads((ev / "eval.json").read_text())
    m = result["metrics"]
    assert result["kind"] == "classification" and result["examples"] == 12
    assert set(m["precision"]) == set(m["recall"]) == set(TITLES) and 0 <= m["f1_macro"] <= m["accuracy"] + 1
    assert sum(map(sum, m["confusion_matrix"])) == 12
    tags = tb(ev).Tags()
    assert {"eval/accuracy", "eval/f1_macro", "eval/precision/Pride_and_Prejudice"} <= set(tags["scalars"])
    assert "eval/confusion" in tags["images"]


@pytest.mark.slow
def test_eval_text_and_classify_from_scratch(pretrained, tmp_path, data_cache):
    paragraphs = [
        f"Paragraph {i}: it is a truth universally acknowledged that a single man wants a wife." for i in range(40)
    ]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(paragraphs), encoding="utf-8")
    ev = tmp_path / "eval"
    overrides = ["data=text", f"data.paths=[{text}]", "data.split_paragraphs=true", "data.val_fraction=0.25"]
    run_experiment(["experiment=eval", f"init_from={pretrained}", *overrides, "data.seq_len=32"], ev, data_cache)
    result = json.loads((ev / "eval.json").read_text())
    assert result["kind"] == "text" and {"loss", "perplexity", "accuracy", "tokens"} <= set(result["metrics"])
    m = result["metrics"]  # bits per byte: the loss of the text's tokens over its bytes, in bits; fewer than 8
    assert 0 < m["bpb"] < 8 and m["bytes"] > m["tokens"] > 0

    rows = [{"text": t, "label": lab} for t, lab in [("What a lovely day.", "pos"), ("Dreadful rain.", "neg")] * 10]
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    scratch = tmp_path / "scratch"
    overrides = ["experiment=classify", f"data.paths=[{src}]", "data.vocab_size=300", *TINY[:5], *RUN_CLS]
    run_experiment([*overrides, "trainer.max_steps=2", "data.seq_len=16"], scratch)
    ckpt = torch.load(scratch / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["labels"] == ["neg", "pos"] and ckpt["hyper_parameters"]["model"]["dim"] == 64


# -------------------------------------------------------------------------------------------------- errors


def test_errors_with_init_from(pretrained, tmp_path):
    def fails(overrides: list[str], error=UserError) -> str:
        with pytest.raises(error) as err:
            run_experiment(overrides, tmp_path / "run")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "needs init_from=CKPT" in fails(["experiment=finetune"])
    assert "no such checkpoint file" in fails(["experiment=finetune", f"init_from={tmp_path / 'nope.ckpt'}"])
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(pretrained.read_bytes()[:2000])
    assert "not a readable checkpoint" in fails(["experiment=eval", f"init_from={truncated}"])

    big = tmp_path / "big.json"
    train_tokenizer([f"word{i} " * 3 for i in range(2000)], vocab_size=1000).save(str(big))
    msg = fails(["experiment=finetune", f"init_from={pretrained}", f"data.tokenizer={big}"])
    assert "more than the 512 embedding rows" in msg and "big.json" in msg

    assert "data=classify" in fails(["experiment=classify", f"init_from={pretrained}", "data=sft"])
    assert "is a language model" in fails(["experiment=eval", f"init_from={pretrained}", "data=classify"])

    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d"}])
    assert "rows.jsonl:2: no field data.label_field='label'" in fails(
        ["experiment=classify", f"init_from={pretrained}", f"data.paths=[{src}]"], DataError
    )


def test_merge_model_takes_the_checkpoint_shape():
    saved = debug_model(vocab_size=512, max_seq_len=256)
    asked = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "vocab_size": None, "max_seq_len": 128,
             "dropout": 0.1, "compile": False}  # fmt: skip
    merged = merge_model(asked, saved, {}, "x.ckpt")  # nothing explicit: model=tiny's defaults give way
    assert (merged.dim, merged.n_layers, merged.vocab_size, merged.max_seq_len) == (64, 2, 512, 256)
    assert merged.dropout == 0.1
    merged = merge_model(asked, saved, {"max_seq_len": "model.max_seq_len=128", "vocab_size": "x"}, "x.ckpt")
    assert merged.max_seq_len == 128 and merged.vocab_size == 512  # vocab_size=null contradicts nothing
    with pytest.raises(UserError, match=r"model.dim=256 contradicts init_from=x.ckpt, whose model.dim=64"):
        merge_model(asked, saved, {"dim": "model.dim=256"}, "x.ckpt")
    with pytest.raises(UserError, match=r"^model=tiny contradicts"):
        merge_model(asked, saved, dict.fromkeys(["dim", "n_layers"], "model=tiny"), "x.ckpt")
    with pytest.raises(UserError, match="dropout"):
        merge_model({**asked, "dropout": 1.5}, saved, {}, "x.ckpt")


def test_conflicting_model_override_is_one_line(pretrained, tmp_path):
    """On the command line, a model key that contradicts init_from stops the run before any work."""
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=finetune", f"init_from={pretrained}", "model.n_layers=3",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.n_layers=3 contradicts init_from=") and "model.n_layers=2" in last
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
