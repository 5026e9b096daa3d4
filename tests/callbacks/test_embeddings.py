"""The embedding projector: token counts kept with the prepared corpus, the files TensorBoard's Projector reads, and
one writer under DDP and FSDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from callbacks.embeddings import TAG, EmbeddingProjector, frequent_ids
from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule
from datamodules.tokenizer import token_labels, train_tokenizer
from llm.checkpoints import consolidate
from llm.errors import UserError
from tests.conftest import TINY, compose_config

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want.\n\n"


def corpus_dm(tmp_path: Path) -> PretrainDataModule:
    src = tmp_path / "text.txt"
    if not src.exists():
        src.write_text("".join(f"{TEXT.strip()} Paragraph {i}, of {i * 7}.\n\n" for i in range(200)), encoding="utf-8")
    dm = PretrainDataModule(
        paths=[str(src)], split_paragraphs=True, seq_len=16, vocab_size=300, cache_dir=str(tmp_path / "cache")
    )
    dm.prepare()
    return dm


def test_counts_are_the_train_splits_kept_in_the_cache_and_an_old_entry_still_loads(tmp_path):
    dm = corpus_dm(tmp_path)
    train_ids = np.asarray(dm.corpus.tokens("train"))
    counts = dm.token_counts
    assert counts.dtype == np.int64 and counts.shape == (dm.vocab_size,)
    np.testing.assert_array_equal(counts, np.bincount(train_ids, minlength=dm.vocab_size))  # train only, not val
    assert (dm.corpus.dir / "token_counts.npy").is_file()
    np.testing.assert_array_equal(corpus_dm(tmp_path).token_counts, counts)  # a cache hit reads them back

    (dm.corpus.dir / "token_counts.npy").unlink()  # an entry built before counts were kept
    old = corpus_dm(tmp_path)
    assert old.report["cache"]["hit"] and old.corpus.token_counts is None
    assert old.corpus.dir == dm.corpus.dir  # the same entry, not rebuilt
    np.testing.assert_array_equal(old.token_counts, counts)  # counted from its shards instead


def test_sft_counts_its_train_examples(tmp_path):
    tok = tmp_path / "tokenizer.json"
    train_tokenizer([TEXT] * 20, vocab_size=300).save(str(tok))
    dm = SFTDataModule(tokenizer=str(tok), seq_len=256)
    dm.prepare()
    ids = np.concatenate([e.ids for e in dm.train_dataset.examples])
    np.testing.assert_array_equal(dm.token_counts, np.bincount(ids, minlength=dm.vocab_size))


def test_frequent_ids_and_the_fallback():
    counts = np.array([5, 0, 9, 5, 1])
    ids, c = frequent_ids(counts, vocab=5, top_k=3)
    assert ids.tolist() == [2, 0, 3] and c.tolist() == [9, 5, 5]  # ties in id order
    assert frequent_ids(counts, vocab=5, top_k=10)[0].tolist() == [2, 0, 3, 4]  # never seen: left out
    assert frequent_ids(counts, vocab=3, top_k=10)[0].tolist() == [2, 0]  # ids past the model's rows: left out
    ids, c = frequent_ids(None, vocab=5, top_k=3)
    assert ids.tolist() == [0, 1, 2] and c is None
    with pytest.raises(UserError, match="top_k"):
        EmbeddingProjector(top_k=0)
    with pytest.raises(UserError, match="every_n_steps"):
        EmbeddingProjector(every_n_steps=0)


def read_projector(logdir: Path) -> dict[str, tuple[list[list[str]], np.ndarray]]:
    """What TensorBoard's projector plugin reads: projector_config.pbtxt (parsed with its own proto), and for each
    embedding its metadata.tsv rows and tensors.tsv matrix. {tensor_name: (metadata rows, matrix)}."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    out = {}
    for e in config.embeddings:
        rows = [line.split("\t") for line in (logdir / e.metadata_path).read_text(encoding="utf-8").splitlines()]
        out[e.tensor_name] = (rows, np.loadtxt(logdir / e.tensor_path, delimiter="\t", ndmin=2))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("projector") / "run"
    extra = ["callbacks.embeddings.every_n_steps=4", "callbacks.embeddings.top_k=50", "callbacks.attention=null"]
    train.train(compose_config([*TINY, *extra], run_dir=run_dir, cache_dir=data_cache))
    return run_dir


def test_projector_files_hold_the_most_frequent_tokens_embeddings_and_labels(run, data_cache):
    logdir = run / "tensorboard"
    found = read_projector(logdir)
    assert sorted(found) == [f"{TAG}:00004", f"{TAG}:00006"]  # every 4 steps, and at the end (step 6)
    rows, matrix = found[f"{TAG}:00006"]
    assert rows[0] == ["token", "count"] and len(rows) == 51 and matrix.shape == (50, 64)

    # the rows are those of the final weights, for the 50 most frequent train tokens, labelled readably
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    weight = ckpt["state_dict"]["model.tok_embeddings.weight"].numpy()
    meta = json.loads(next(data_cache.glob("*/meta.json")).read_text())
    counts = np.load(data_cache / meta["key"] / "token_counts.npy")
    ids = np.argsort(-counts, kind="stable")[:50]
    from tokenizers import Tokenizer

    labels = token_labels(Tokenizer.from_file(str(run / "tokenizer.json")), ids.tolist())
    assert [r[0] for r in rows[1:]] == labels and [int(r[1]) for r in rows[1:]] == counts[ids].tolist()
    np.testing.assert_allclose(matrix, weight[ids], rtol=1e-5, atol=1e-6)
    assert "\\n" in labels and not any(ch in "".join(labels) for ch in "\n\t ")  # newlines visible, no raw blanks
    assert any(label.startswith("▁") for label in labels)  # byte-level's Ġ shown as a space mark


def test_tensorboards_projector_plugin_serves_them(run):
    """The projector plugin itself, behind TensorBoard's WSGI app as `tensorboard --logdir` runs it, finds the run
    and serves the tensor and the labels the files hold."""
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    logdir = str(run.parent)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=logdir, multiplexer=multiplexer, data_provider=provider))
    client = Client(application.TensorBoardWSGI([plugin]))
    route = "/data/plugin/projector"

    assert json.loads(client.get(f"{route}/runs").get_data()) == ["run/tensorboard"]
    query = f"run=run/tensorboard&name={TAG}:00006"
    info = json.loads(client.get(f"{route}/info?run=run/tensorboard").get_data())
    assert {e["tensorName"]: e["tensorShape"] for e in info["embeddings"]}[f"{TAG}:00006"] == [50, 64]
    served = np.frombuffer(client.get(f"{route}/tensor?{query}").get_data(), dtype=np.float32).reshape(50, 64)
    rows, matrix = read_projector(run / "tensorboard")[f"{TAG}:00006"]
    np.testing.assert_allclose(served, matrix, rtol=1e-6)
    assert client.get(f"{route}/metadata?{query}").get_data(as_text=True).splitlines() == ["\t".join(r) for r in rows]


def test_no_counts_fall_back_to_the_first_ids(tmp_path, data_cache, monkeypatch):
    """A datamodule without counts (here: one whose counts are hidden) logs the first top_k ids, without a count
    column; the rest of the run is as usual."""
    monkeypatch.setattr(PretrainDataModule, "token_counts", property(lambda self: None))
    run_dir = tmp_path / "run"
    extra = ["callbacks.embeddings.top_k=20", "callbacks.attention=null", "trainer.max_steps=2"]
    train.train(compose_config([*TINY, *extra], run_dir=run_dir, cache_dir=data_cache))
    (rows, matrix) = read_projector(run_dir / "tensorboard")[f"{TAG}:00002"]
    assert len(rows) == 20 and rows[0] == ["<|bos|>"] and matrix.shape == (20, 64)


def assert_written_once(run_dir: Path, steps: list[int], n_layers: int = 2) -> None:
    """Checks of a multi-process run (tests/test_distributed.py calls it on its DDP, FSDP and TP runs, so that no
    2-process run is added for them): rank 0 alone wrote the projector's files and the attention maps, once each.

    ``steps``: the validations' steps; the last is the end of training."""
    logdir = run_dir / "tensorboard"
    found = read_projector(logdir)
    end = f"{steps[-1]:05d}"
    assert list(found) == [f"{TAG}:{end}"]  # one entry: a second writer would have appended its own
    assert sorted(p.name for p in logdir.iterdir() if p.is_dir()) == [end]
    rows, matrix = found[f"{TAG}:{end}"]
    assert len(rows) - 1 == matrix.shape[0] > 0  # a header and a row per token
    # whole rows of the final embedding (under FSDP gathered from both shards, not rank 0's half)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = consolidate(last) if last.is_dir() else torch.load(last, weights_only=False)
    weight = ckpt["state_dict"]["model.tok_embeddings.weight"].float().numpy()
    assert (np.abs(matrix[:, None, :] - weight[None]).max(-1).min(-1) < 1e-6).all()
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(t for t in acc.Tags()["images"] if t.startswith("attention/")) == [
        f"attention/layer_{i}" for i in range(n_layers)
    ]
    assert [e.step for e in acc.Images("attention/layer_0")] == steps  # once per validation
