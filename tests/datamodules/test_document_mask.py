"""Document masking in pretraining (data.document_mask): segments and positions follow the EOS tokens of each window,
the batches are otherwise today's (same windows, order, labels and corpus cache), a masked forward computes each
document as if alone, and train.py runs with it (and resumes exactly)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datamodules.dataset import EvenWindows, TokenWindows, document_layout
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import EMBEDDED_CORPUS, read_file
from llm.core.model import Transformer
from tests.conftest import ROOT, TINY, compose_config, debug_model
from tests.test_resume import EXACT, assert_same_weights, losses, weights

SMALL = {"seq_len": 64, "batch_size": 4, "vocab_size": 512}
BOS, EOS, PAD = 0, 1, 2  # the special ids of our trained tokenizers (tests/datamodules/test_pretrain.py)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """~300 paragraphs of Emma, one document each: quick to prepare, many documents per window."""
    paras = [p for _, p in zip(range(300), read_file(EMBEDDED_CORPUS, split_paragraphs=True))]
    path = tmp_path_factory.mktemp("src") / "emma.txt"
    path.write_text("\n".join(paras), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_dm(src: Path, cache: Path, **kw) -> PretrainDataModule:
    args = {"paths": [str(src)], "split_paragraphs": True, "cache_dir": str(cache), "val_fraction": 0.1, **SMALL}
    dm = PretrainDataModule(**{**args, **kw})
    dm.prepare()
    return dm


def expected_layout(ids: list[int], n_real: int) -> tuple[list[int], list[int]]:
    """The rule written out token by token: a new document after each EOS, positions counting from it."""
    segments, positions = [], []
    seg, pos = 0, 0
    for t in range(n_real):
        if t and ids[t - 1] == EOS:
            seg, pos = seg + 1, 0
        segments.append(seg)
        positions.append(pos)
        pos += 1
    pad = len(ids) - n_real
    return segments + [seg + 1 if n_real else 0] * pad, positions + [0] * pad


def test_layout_of_a_hand_made_stream(tmp_path):
    # BOS doc EOS, three documents; the first window opens inside a document; EOS is also the padding id
    stream = [BOS, 5, 6, EOS, BOS, 7, EOS, BOS, 8, 9, 10, EOS, BOS, 11]
    path = tmp_path / "t.bin"
    np.array(stream, dtype=np.uint16).tofile(path)
    ds = TokenWindows(path, "uint16", len(stream), seq_len=4, tail=True, pad_id=EOS, eos_id=EOS)
    assert len(ds) == 4
    w = ds[0]  # inputs BOS 5 6 EOS
    assert w["segments"].tolist() == [0, 0, 0, 0] and w["positions"].tolist() == [0, 1, 2, 3]
    w = ds[1]  # inputs BOS 7 EOS BOS: the EOS ends document 0, the BOS opens document 1
    assert w["segments"].tolist() == [0, 0, 0, 1] and w["positions"].tolist() == [0, 1, 2, 0]
    w = ds[2]  # inputs 8 9 10 EOS: the end of a document begun in the previous window, from position 0
    assert w["segments"].tolist() == [0, 0, 0, 0] and w["positions"].tolist() == [0, 1, 2, 3]
    w = ds[3]  # the tail: inputs BOS + 3 padding (EOS ids, which start no segment); labels 11 then ignored
    assert w["input_ids"].tolist() == [BOS, EOS, EOS, EOS] and w["labels"].tolist() == [11, -100, -100, -100]
    assert w["segments"].tolist() == [0, 1, 1, 1] and w["positions"].tolist() == [0, 0, 0, 0]
    for i in range(len(ds)):  # the labels are those of the unmasked windows
        plain = TokenWindows(path, "uint16", len(stream), seq_len=4, tail=True, pad_id=EOS)[i]
        assert set(plain) == {"input_ids", "labels"}
        assert all(torch.equal(plain[k], ds[i][k]) for k in plain)
    empty = EvenWindows(ds, 3)[5]  # a rank's filler: padding only, one segment
    assert set(empty) == set(ds[0]) and (empty["labels"] == -100).all() and (empty["segments"] == 0).all()
    for key in ("segments", "positions"):
        assert w[key].dtype == torch.long


def test_layout_of_random_windows():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        T = int(torch.randint(1, 40, (), generator=g))
        ids = torch.randint(0, 4, (T,), generator=g)  # EOS often, runs of EOS, EOS first and last
        n_real = int(torch.randint(0, T + 1, (), generator=g))
        layout = document_layout(ids, EOS, n_real)
        segments, positions = expected_layout(ids.tolist(), n_real)
        assert layout["segments"].tolist() == segments and layout["positions"].tolist() == positions


def test_batches_follow_the_eos_tokens_and_are_otherwise_unchanged(src, cache):
    plain, masked = make_dm(src, cache), make_dm(src, cache, document_mask=True)
    assert masked.report["cache"] == {"key": plain.report["cache"]["key"], "hit": True}  # not a corpus setting
    assert (masked.bos_id, masked.eos_id) == (BOS, EOS)
    loaders = [(plain.train_dataloader(), masked.train_dataloader()), (plain.val_dataloader(), masked.val_dataloader())]
    documents = 0
    for plain_loader, masked_loader in loaders:
        for a, b in zip(plain_loader, masked_loader, strict=True):
            assert set(a) == {"input_ids", "labels"}  # without the flag: today's batch, no new keys
            assert set(b) == {"input_ids", "labels", "segments", "positions"}
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            for row in range(b["input_ids"].shape[0]):
                ids = b["input_ids"][row].tolist()
                n_real = int((b["labels"][row] != -100).sum())
                segments, positions = expected_layout(ids, n_real)
                assert b["segments"][row].tolist() == segments and b["positions"][row].tolist() == positions
                starts = [t for t in range(1, n_real) if positions[t] == 0]
                assert all(ids[t] == BOS for t in starts)  # each document after the first opens with its BOS
                documents += len(starts)
            assert b["segments"].shape == b["positions"].shape == b["input_ids"].shape
    assert documents > 100


def test_masked_forward_equals_each_document_alone(src, cache):
    """float32: every document of a window, through the block-diagonal mask and restarted positions, gets the
    logits of the same tokens run alone from position 0 (the first, partial one too); without the mask they differ."""
    dm = make_dm(src, cache, document_mask=True, seq_len=256)  # the paragraphs: ~115 tokens (median)
    torch.manual_seed(0)
    model = Transformer(debug_model(vocab_size=dm.vocab_size, max_seq_len=256, init_std=0.1)).eval()  # sharp
    whole = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():  # the val split, whole (its padded tail too)
            masked = model(batch["input_ids"], input_pos=batch["positions"], segments=batch["segments"])
            unmasked = model(batch["input_ids"])
            for row in range(batch["input_ids"].shape[0]):
                real = batch["labels"][row] != -100
                for s in batch["segments"][row, real].unique().tolist():
                    where = (batch["segments"][row] == s) & real
                    ids = batch["input_ids"][row, where]
                    alone = model(ids[None])[0]
                    torch.testing.assert_close(masked[row, where], alone, rtol=0, atol=1e-5)
                    if s > 0 and ids[0] == BOS and ids[-1] == EOS:  # a document wholly inside the window
                        whole += 1
                        assert not torch.allclose(unmasked[row, where], alone, atol=1e-3)  # it saw the one before
    assert whole >= 5


def test_config_composes_with_the_flag(tmp_path):
    for group in (["data=corpus"], ["data=text", f"data.paths=[{tmp_path}]"]):
        assert compose_config(group).data.document_mask is False
        assert compose_config([*group, "data.document_mask=true"]).data.document_mask is True


def read_scalars(logdir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_train_py_with_document_mask_end_to_end(tmp_path, data_cache):
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "data.document_mask=true", f"data.cache_dir={data_cache}"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok"
    scalars = read_scalars(run / "tensorboard")
    assert len(scalars["val/loss"]) >= 2 and len(scalars["train/loss"]) == 6
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["datamodule_hyper_parameters"]["document_mask"] is True


@pytest.mark.slow
def test_stop_and_resume_with_document_mask_equals_uninterrupted(tmp_path, data_cache):
    """As tests/test_resume.py's test, with the mask: bitwise the same losses and weights (float32, CPU)."""
    extra = [*TINY, *EXACT, "data.document_mask=true"]
    straight = tmp_path / "straight"
    train.train(compose_config(extra, run_dir=straight, cache_dir=data_cache))
    resumed = tmp_path / "resumed"
    stop = ["+callbacks.stop._target_=tests.test_resume.StopAt", "+callbacks.stop.step=4"]  # mid-epoch
    train.train(compose_config([*extra, *stop], run_dir=resumed, cache_dir=data_cache))
    train.train(compose_config([*extra, "ckpt_path=last"], run_dir=resumed, cache_dir=data_cache))
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(8)) and a == b
    assert_same_weights(weights(straight), weights(resumed))
