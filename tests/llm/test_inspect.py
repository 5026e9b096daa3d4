"""python -m llm.inspect neighbours: nearest tokens by embedding cosine similarity, on every kind of checkpoint; and
the readable token labels the TensorBoard callbacks share."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from datamodules.tokenizer import token_labels, train_tokenizer
from llm import convert
from llm.core import lora
from llm.core.model import Transformer
from llm.inspect import main, word_ids
from llm.training import checkpoint
from tests.conftest import ROOT, debug_model

TEXT = [
    "It is a truth universally acknowledged, that a single man\nin possession of a good fortune — “must” be.\t"
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=400)  # merges run out at 332: every word of TEXT one token


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A training-shaped checkpoint whose embedding has a planted neighbour: " man" is " truth" plus a little noise,
    " single" the negative of " truth"."""
    torch.manual_seed(0)
    cfg = debug_model(vocab_size=tokenizer.get_vocab_size())
    model = Transformer(cfg)
    truth, man, single = (word_ids(tokenizer, w)[0] for w in ("truth", "man", "single"))
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        emb[man] = emb[truth] + 0.001 * torch.randn(cfg.dim)  # the init std is 0.02: cosine ~0.999
        emb[single] = -emb[truth]
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()}, "tokenizer": tokenizer.to_str()}, path
    )
    return path


def neighbours_of(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["neighbours", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_neighbours_ranks_by_cosine_similarity(base, capsys, tokenizer):
    code, lines, _ = neighbours_of(capsys, f"ckpt_path={base}", "word=truth", "k=4")
    assert code == 0 and len(lines) == 1 + 4
    assert lines[0].startswith("# 'truth' = ▁truth: nearest tokens to its embedding")  # the in-sentence form
    sims = [float(line.split()[0]) for line in lines[1:]]
    assert lines[1].split()[1] == "▁man" and sims[0] > 0.99  # the planted neighbour first
    assert sims == sorted(sims, reverse=True) and "▁truth" not in [line.split()[1] for line in lines[1:]]
    assert "▁single" not in lines[-1]  # the opposite is the farthest, not among the nearest


def test_a_word_of_several_tokens_uses_their_mean_and_says_so(base, capsys, tokenizer):
    ids = word_ids(tokenizer, "acknowledged, that")
    assert len(ids) > 1
    code, lines, _ = neighbours_of(capsys, f"ckpt_path={base}", "word='acknowledged, that'")
    assert code == 0 and f"the mean of its {len(ids)} token embeddings" in lines[0] and len(lines) == 11


def test_converted_and_lora_adapter_checkpoints_give_the_same_neighbours(base, tmp_path, capsys):
    hf = convert.to_hf(base, tmp_path / "hf")
    converted = convert.from_hf(hf, tmp_path / "converted.ckpt")
    # an adapter checkpoint on the base, as adapters.keep_trainable writes it: adapters in, embeddings untouched
    adapter = lora.LoRAConfig(rank=2, alpha=4.0, targets=("wq", "wk"))
    model = Transformer(
        debug_model(vocab_size=torch.load(base, weights_only=False)["hyper_parameters"]["model"]["vocab_size"])
    )
    lora.apply(model, adapter)
    ckpt = torch.load(base, weights_only=False)
    adapters = {f"model.{k}": v.normal_() for k, v in model.state_dict().items() if lora.is_adapter_key(k)}
    torch.save(
        {
            "state_dict": adapters,
            "hyper_parameters": {**ckpt["hyper_parameters"], "adapter": adapter.to_dict()},
            "tokenizer": ckpt["tokenizer"],
            "adapter": {"config": adapter.to_dict(), "base": {"path": str(base), "sha256": checkpoint.digest(base)}},
        },
        tmp_path / "adapter.ckpt",
    )
    results = [
        neighbours_of(capsys, f"ckpt_path={p}", "word=truth") for p in (base, converted, tmp_path / "adapter.ckpt")
    ]
    assert all(code == 0 for code, _, _ in results)
    assert results[1][1] == results[0][1] and results[2][1] == results[0][1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["word=truth"], "ckpt_path=CKPT is required"),
        (["ckpt_path={base}"], "word=WORD is required"),
        (["ckpt_path={base}", "word="], "word=WORD is required"),
        (["ckpt_path={base}", "word=truth", "colour=red"], "unknown argument(s): colour"),
        (["ckpt_path={base}", "word=truth", "k=0"], "k=0 must be >= 1"),
        (["ckpt_path={base}", "word=truth", "k=many"], "k='many' is not an integer"),
        (["ckpt_path={base}.missing", "word=truth"], "no such checkpoint file"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_2(base, capsys, args, message):
    code, lines, err = neighbours_of(capsys, *(a.format(base=base) for a in args))
    assert code == 2 and not lines and err.count("\n") == 1 and message in err, err


def test_as_a_command_bad_input_exits_2_without_a_traceback(base):
    argv = ["neighbors", f"ckpt_path={base}"]  # misspelt
    proc = subprocess.run([sys.executable, "-m", "llm.inspect", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage:") and proc.stderr.count("\n") == 1
    proc = subprocess.run(
        [sys.executable, "-m", "llm.inspect", "neighbours", f"ckpt_path={base}", "word=truth", "k=2"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3 and "▁man" in proc.stdout


def test_token_labels_are_readable(tokenizer):
    ids = tokenizer.encode("It is\na truth — “must”\t", add_special_tokens=True).ids
    labels = token_labels(tokenizer, ids)
    assert labels[0] == "<|bos|>"  # a special token by its name
    text = "".join(labels)
    assert "▁truth" in labels or "▁tru" in text  # a space as ▁
    assert "\\n" in text and "\\t" in text and not any(c in text for c in " \n\t")
    # an incomplete UTF-8 character shows its bytes; whole ones show as themselves
    pieces = [tokenizer.id_to_token(i) for i in ids]
    assert all(("\\x" in label) == ("\ufffd" in tokenizer.decode([i])) for i, label in zip(ids, labels)), pieces
    assert token_labels(tokenizer, [tokenizer.get_vocab_size() + 5]) == [f"<id {tokenizer.get_vocab_size() + 5}>"]
