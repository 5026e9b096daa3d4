"""The prepared corpus: BOS and EOS per document, split by document, the report, the content-keyed cache, shards
through the pipeline, worker processes, crashes and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import filecache, shards
from datamodules.cache import cache_key
from datamodules.corpus import CorpusSettings, prepare_corpus, split_documents
from datamodules.dataset import TokenWindows
from datamodules.sources import EMBEDDED_CORPUS, DataError, read_file
from datamodules.tokenizer import train_tokenizer

NO_FILTERS = [{"name": "whitespace"}]  # keep every document (tests count them)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    paras = (p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True))
    return [p for _, p in zip(range(300), (p for p in paras if len(p) > 40))]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def settings(path: Path, **kw) -> CorpusSettings:
    base = {"paths": [str(path)], "vocab_size": 400, "val_fraction": 0.1, "seed": 7, "cleaning": NO_FILTERS}
    return CorpusSettings(**{**base, **kw})


def segments(tokens: np.ndarray, eos: int) -> list[list[int]]:
    out, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [], "the stream ends with EOS"
    return out


def test_split_documents_seeded():
    a = split_documents(100, 0.1, seed=1)
    assert a.sum() == 10 and a.dtype == bool
    assert (a == split_documents(100, 0.1, seed=1)).all()
    assert (a != split_documents(100, 0.1, seed=2)).any()
    assert split_documents(3, 0.01, seed=0).sum() == 1  # at least one val document
    assert split_documents(2, 0.99, seed=0).sum() == 1  # at least one train document


@pytest.mark.parametrize("n, frac", [(1, 0.1), (10, 0.0), (10, 1.0)])
def test_split_documents_errors(n, frac):
    with pytest.raises(DataError):
        split_documents(n, frac, seed=0)


def test_eos_per_document_and_split_by_document(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    corpus = prepare_corpus(settings(src), tmp_path / "cache")
    tok, eos = corpus.tokenizer, corpus.report["tokenizer"]["eos_id"]
    assert eos == 1 and corpus.dtype == np.uint16
    train, val = corpus.tokens("train"), corpus.tokens("val")
    assert isinstance(train.shard(0), np.memmap) and train.dtype == np.uint16
    assert (len(train), len(val)) == (corpus.n_train, corpus.n_val)
    assert corpus.report["tokens"] == {"train": len(train), "val": len(val)}
    # every document is whole in exactly one split, BOS before it and one EOS after it
    bos = corpus.report["tokenizer"]["bos_id"]
    for split in (train, val):
        segs = segments(np.asarray(split), eos)
        assert all(seg[0] == bos and bos not in seg[1:] for seg in segs)
    train_docs = [tok.decode(s) for s in segments(np.asarray(train), eos)]
    val_docs = [tok.decode(s) for s in segments(np.asarray(val), eos)]
    assert len(val_docs) == round(0.1 * len(paragraphs)) == corpus.report["split"]["val_documents"]
    assert sorted(train_docs + val_docs) == sorted(paragraphs)
    mask = split_documents(len(paragraphs), 0.1, seed=7)
    assert val_docs == [d for d, v in zip(paragraphs, mask) if v]  # in corpus order, chosen by the seed
    assert train_docs == [d for d, v in zip(paragraphs, mask) if not v]


def test_tokenizer_trained_on_train_split_only(tmp_path):
    # two documents that share no characters: the val one's text must not produce merges
    docs = ["abab " * 200, "xyxy " * 200]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    corpus = prepare_corpus(settings(src, val_fraction=0.5, seed=0), tmp_path / "cache")
    val_doc = docs[int(np.flatnonzero(split_documents(2, 0.5, seed=0))[0])]
    word = val_doc.split()[0]
    assert corpus.tokenizer.token_to_id("Ġ" + word) is None and corpus.tokenizer.token_to_id(word) is None


def test_tokenizer_sample_bytes(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    full = prepare_corpus(settings(src, vocab_size=1000), tmp_path / "cache").report["tokenizer"]
    part = prepare_corpus(settings(src, vocab_size=1000, tokenizer_sample_bytes=5000), tmp_path / "cache").report[
        "tokenizer"
    ]
    train_bytes = sum(len(p.encode()) for p, v in zip(paragraphs, split_documents(len(paragraphs), 0.1, 7)) if not v)
    assert full["trained_on_bytes"] == train_bytes
    assert 2000 < part["trained_on_bytes"] < 10_000  # a seeded sample of about 5 kB
    assert part["vocab_size"] < full["vocab_size"] == 1000  # too little text for every merge


def test_report_contents(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:50] + ["tiny", "tiny"])
    rules = [{"name": "nfc"}, {"name": "min_chars", "value": 10}]
    corpus = prepare_corpus(settings(src, cleaning=rules), tmp_path / "cache")
    rep = corpus.report
    assert rep["sources"]["files"] == 1 and rep["sources"]["bytes"] == src.stat().st_size
    assert rep["documents"] == {"read": 52, "kept": 50, "dropped": 2}
    assert rep["rules"]["min_chars"] == {"dropped": 2, "changed": 0, "examples": ["tiny", "tiny"]}
    assert rep["tokenizer"]["trained"] is True and rep["tokenizer"]["vocab_size"] == 400
    assert rep["cache"]["hit"] is False and rep["invalid_utf8_replacements"] == 0
    assert rep["skipped_files"] == [] and rep["seconds"] >= 0
    meta = json.loads((corpus.dir / "meta.json").read_text())
    assert meta["complete"] is True
    assert sorted(p.name for p in corpus.dir.iterdir()) == [
        "meta.json",
        "report.json",
        "token_counts.npy",
        "tokenizer.json",
        "train-00000.bin",
        "val-00000.bin",
    ]
    assert meta["shards"] == {
        "train": [{"file": "train-00000.bin", "tokens": corpus.n_train}],
        "val": [{"file": "val-00000.bin", "tokens": corpus.n_val}],
    }


def test_cache_reuse_and_invalidation(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    cache = tmp_path / "cache"
    first = prepare_corpus(settings(src), cache)
    t0 = time.perf_counter()
    second = prepare_corpus(settings(src), cache)
    assert time.perf_counter() - t0 < 1.0
    assert second.report["cache"] == {"key": first.report["cache"]["key"], "hit": True}
    assert second.dir == first.dir and (np.asarray(second.tokens("train")) == np.asarray(first.tokens("train"))).all()

    # same size and mtime, different content: still a rebuild
    stat = src.stat()
    original = src.read_bytes()
    src.write_bytes(original.replace(b"a", b"e", 1))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    changed = prepare_corpus(settings(src), cache)
    assert changed.report["cache"]["hit"] is False and changed.dir != first.dir
    src.write_bytes(original)

    # every setting that changes the output is in the key
    keys = {first.report["cache"]["key"], changed.report["cache"]["key"]}
    for kw in (
        {"cleaning": [*NO_FILTERS, {"name": "min_chars", "value": 50}]},
        {"vocab_size": 450},
        {"val_fraction": 0.2},
        {"seed": 8},
        {"tokenizer_sample_bytes": 10_000},
        {"split_paragraphs": True},
    ):
        corpus = prepare_corpus(settings(src, **kw), cache)
        assert corpus.report["cache"]["hit"] is False, kw
        keys.add(corpus.report["cache"]["key"])
    assert len(keys) == 8
    assert prepare_corpus(settings(src), cache).report["cache"]["hit"] is True
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_incomplete_cache_is_rebuilt(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:40])
    first = prepare_corpus(settings(src), tmp_path / "cache")
    meta = first.dir / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "complete": False}))
    again = prepare_corpus(settings(src), tmp_path / "cache")
    assert again.report["cache"]["hit"] is False and json.loads(meta.read_text())["complete"] is True


def test_given_tokenizer_is_used(tmp_path, paragraphs):
    tok = train_tokenizer(paragraphs, vocab_size=300)
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:40])
    corpus = prepare_corpus(settings(src, tokenizer=str(tok_path)), tmp_path / "cache")
    assert corpus.report["tokenizer"]["trained"] is False and corpus.report["tokenizer"]["source"] == str(tok_path)
    assert corpus.tokenizer.get_vocab_size() == 300
    # an edited tokenizer file is a different cache entry
    train_tokenizer(paragraphs, vocab_size=320).save(str(tok_path))
    assert prepare_corpus(settings(src, tokenizer=str(tok_path)), tmp_path / "cache").report["cache"]["hit"] is False


def test_empty_corpus_error(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    with pytest.raises(DataError, match="no documents in .*empty.jsonl"):
        prepare_corpus(settings(src), tmp_path / "cache")


def test_corpus_emptied_by_cleaning_error(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["short", "also short"])
    with pytest.raises(DataError, match=r"data\.cleaning dropped all 2 documents .*min_chars: 2"):
        prepare_corpus(settings(src, cleaning=[{"name": "min_chars", "value": 100}]), tmp_path / "cache")
    # nothing half-built left behind (the file's own cleaned entry is complete: kept for the next try)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == ["files"]
    assert not list((tmp_path / "cache" / "files").glob("*.tmp-*"))


def test_shards_and_index_read_as_one_stream(tmp_path, paragraphs, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    whole = prepare_corpus(settings(src), tmp_path / "one")
    monkeypatch.setattr(shards, "SHARD_TOKENS", 1000)
    sharded = prepare_corpus(settings(src), tmp_path / "many")
    assert sharded.report["cache"]["key"] == whole.report["cache"]["key"]  # the layout is not the content
    train = sharded.tokens("train")
    n_shards = -(-sharded.n_train // 1000)
    assert [p.name for p, _ in sharded.shards("train")] == [f"train-{i:05d}.bin" for i in range(n_shards)]
    assert [n for _, n in sharded.shards("train")][:-1] == [1000] * (n_shards - 1)
    assert sharded.report["packing"]["shards"] == {"train": n_shards, "val": -(-sharded.n_val // 1000)}
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(sharded.tokens(split)), np.asarray(whole.tokens(split)))
    reference = np.asarray(whole.tokens("train"))
    assert np.array_equal(train[990:2010], reference[990:2010])  # a slice over three shards
    assert train[1000] == reference[1000] and train[-1] == reference[-1]
    windows = TokenWindows(sharded.shards("train"), sharded.dtype, sharded.n_train, seq_len=333)
    flat = TokenWindows(str(whole.dir / "train-00000.bin"), whole.dtype, whole.n_train, seq_len=333)
    assert len(windows) == len(flat)
    for i in range(len(flat)):
        assert torch.equal(windows[i]["input_ids"], flat[i]["input_ids"])


def test_worker_processes_give_the_same_output(tmp_path, paragraphs):
    (tmp_path / "in").mkdir()
    for i in range(4):  # one task per file
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", paragraphs[i::4])
    one = prepare_corpus(settings(tmp_path / "in", num_proc=1), tmp_path / "one")
    two = prepare_corpus(settings(tmp_path / "in", num_proc=2), tmp_path / "two")
    assert one.report["files"] == {"files": 4, "cleaned": 4, "clean_processes": 1, "encoded": 4, "encode_processes": 1}
    assert two.report["files"] == {"files": 4, "cleaned": 4, "clean_processes": 2, "encoded": 4, "encode_processes": 2}
    assert two.report["cache"]["key"] == one.report["cache"]["key"]  # num_proc changes the speed, not the output
    assert two.report["rules"] == one.report["rules"]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(two.tokens(split)), np.asarray(one.tokens(split)))


def test_crash_mid_build_leaves_nothing_trusted(tmp_path, paragraphs, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    cache = tmp_path / "cache"
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while encoding
        return real(*args, **kwargs)

    real = filecache.encode_with_lengths
    monkeypatch.setattr(filecache, "ENCODE_BATCH_BYTES", 5_000)
    monkeypatch.setattr(filecache, "encode_with_lengths", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(settings(src), cache)
    # no corpus entry, no temporary directory or file: only the file's cleaned entry, complete, kept for the next try
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "files"]
    (entry,) = (cache / "files").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["docs.npz", "docs.spool", "summary.json"]
    # a build killed outright (no clean-up) leaves its temporary directory: never trusted, removed by the next
    monkeypatch.setattr(filecache, "encode_with_lengths", real)
    key = cache_key([src], settings(src))
    (cache / f"{key}.tmp-killed").mkdir()
    (cache / f"{key}.tmp-killed" / "meta.json").write_text('{"complete": true}')
    corpus = prepare_corpus(settings(src), cache)
    assert corpus.report["cache"]["hit"] is False
    assert sorted(p.name for p in cache.iterdir()) == sorted([".lock", "files", key])


def test_damaged_shard_is_rebuilt(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:40])
    first = prepare_corpus(settings(src), tmp_path / "cache")
    with open(first.dir / "train-00000.bin", "r+b") as f:
        f.truncate(10)
    again = prepare_corpus(settings(src), tmp_path / "cache")
    assert again.report["cache"]["hit"] is False and again.n_train == first.n_train


def test_unreadable_input_is_a_one_line_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["x" * 100])
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")  # a directory listing names it
    with pytest.raises(DataError, match=r"dangling\.jsonl: cannot be read \(No such file or directory\)"):
        prepare_corpus(settings(tmp_path), tmp_path / "cache")


def test_only_binary_files_is_an_error_naming_them(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "in" / "b.txt").write_text("")
    with pytest.raises(DataError) as e:
        prepare_corpus(settings(tmp_path / "in"), tmp_path / "cache")
    assert str(e.value) == (
        f"data.paths: no documents in {tmp_path / 'in'} (1 empty file; 1 skipped, e.g. {tmp_path / 'in' / 'a.txt'}: "
        "binary file (NUL bytes))"
    )
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", "files"]  # and no corpus entry


def test_unguarded_script_with_workers_falls_back_instead_of_hanging(tmp_path, paragraphs):
    """spawn re-imports the calling script in each worker; without the ``__main__`` guard the workers die while
    starting. The build must not hang: this process encodes instead, to the same result."""
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", paragraphs[:50])
    write_jsonl(src / "b.jsonl", paragraphs[50:100])
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from datamodules.corpus import CorpusSettings, prepare_corpus\n"
        f"s = CorpusSettings(paths=[{str(src)!r}], vocab_size=400, cleaning=[{{'name': 'whitespace'}}], num_proc=2)\n"
        f"c = prepare_corpus(s, {str(tmp_path / 'cache')!r})\n"
        "print('processes', c.report['packing']['encode_processes'], 'tokens', c.n_train + c.n_val)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "preparing the files in this process instead" in proc.stderr and "__main__" in proc.stderr
    reference = prepare_corpus(
        CorpusSettings(paths=[str(src)], vocab_size=400, cleaning=[{"name": "whitespace"}]), tmp_path / "ref"
    )
    assert proc.stdout.split() == ["processes", "1", "tokens", str(reference.n_train + reference.n_val)]


# ---------------------------------------------------------------------------------------------------------
# val_paths: a held-out set of its own


def test_val_paths_are_the_val_split(tmp_path, paragraphs):
    train_docs, val_docs = paragraphs[:40], [*paragraphs[40:50], paragraphs[0]]  # the last is also in train
    src = write_jsonl(tmp_path / "train.jsonl", train_docs)
    held = write_jsonl(tmp_path / "held.jsonl", [*val_docs, paragraphs[41]])  # a duplicate within val too
    rules = [{"name": "whitespace"}, {"name": "dedup"}]
    corpus = prepare_corpus(settings(src, val_paths=[str(held)], cleaning=rules), tmp_path / "cache")
    rep, tok, eos = corpus.report, corpus.tokenizer, corpus.report["tokenizer"]["eos_id"]
    # train is all of data.paths, val exactly the (cleaned, deduplicated) documents of data.val_paths, in order
    assert [tok.decode(s) for s in segments(np.asarray(corpus.tokens("train")), eos)] == train_docs
    assert [tok.decode(s) for s in segments(np.asarray(corpus.tokens("val")), eos)] == val_docs
    assert rep["split"] == {
        "train_documents": 40,
        "val_documents": 11,
        "val_split": "data.val_paths",
        "val_fraction": None,
        "seed": 7,
        "val_in_train": 1,  # dedup is per split: contamination is kept, and counted
    }
    assert rep["documents"] == {"read": 40, "kept": 40, "dropped": 0}
    assert rep["sources"]["files"] == 1 and rep["sources"]["bytes"] == src.stat().st_size
    assert rep["val"]["documents"] == {"read": 12, "kept": 11, "dropped": 1}
    assert rep["val"]["rules"]["dedup"]["dropped"] == 1
    assert rep["val"]["sources"] == {
        "paths": [str(held)],
        "files": 1,
        "bytes": held.stat().st_size,
        "empty_files": 0,
        "skipped_files": 0,
    }
    # the tokenizer is trained on data.paths alone
    assert rep["tokenizer"]["trained_on_bytes"] == sum(len(d.encode()) for d in train_docs)
    assert rep["tokens"] == {"train": corpus.n_train, "val": corpus.n_val}


def test_tokenizer_not_trained_on_val_paths(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", ["abab " * 200])
    held = write_jsonl(tmp_path / "held.jsonl", ["xyxy " * 200])
    corpus = prepare_corpus(settings(src, val_paths=[str(held)]), tmp_path / "cache")
    assert corpus.tokenizer.token_to_id("Ġxyxy") is None and corpus.tokenizer.token_to_id("xyxy") is None
    assert corpus.tokenizer.token_to_id("Ġabab") is not None  # (the check can fail: the train word is one token)


def test_val_paths_cache_key(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "train.jsonl", paragraphs[:40])
    held = write_jsonl(tmp_path / "held.jsonl", paragraphs[40:50])
    cache = tmp_path / "cache"
    first = prepare_corpus(settings(src, val_paths=[str(held)]), cache)
    assert prepare_corpus(settings(src, val_paths=[str(held)]), cache).report["cache"]["hit"] is True
    fraction = prepare_corpus(settings(src), cache)
    assert fraction.report["cache"]["key"] != first.report["cache"]["key"]
    assert fraction.report["split"]["val_split"] == "data.val_fraction=0.1 (seed 7)"
    assert fraction.report["split"]["val_in_train"] is None and "val" not in fraction.report
    write_jsonl(held, paragraphs[40:51])  # the val file changes: a rebuild
    changed = prepare_corpus(settings(src, val_paths=[str(held)]), cache)
    assert changed.report["cache"]["hit"] is False and changed.report["split"]["val_documents"] == 11
    key = cache_key([src], settings(src, val_paths=[str(held)]), [held])
    assert key == changed.report["cache"]["key"] != first.report["cache"]["key"]


def test_val_paths_only(tmp_path, paragraphs):
    """No train sources (evaluation): the val split alone, with a given tokenizer."""
    src = write_jsonl(tmp_path / "train.jsonl", paragraphs[:40])
    tok_file = tmp_path / "tok.json"
    prepare_corpus(settings(src), tmp_path / "cache").tokenizer.save(str(tok_file))
    held = write_jsonl(tmp_path / "held.jsonl", paragraphs[40:50])
    corpus = prepare_corpus(settings(src, paths=[], val_paths=[str(held)], tokenizer=str(tok_file)), tmp_path / "c")
    assert corpus.n_train == 0 and corpus.report["split"]["val_documents"] == 10
    assert corpus.report["sources"]["files"] == 0 and corpus.report["val"]["documents"]["kept"] == 10
    with pytest.raises(DataError, match=r"no train documents to train a tokenizer on.*data\.tokenizer"):
        prepare_corpus(settings(src, paths=[], val_paths=[str(held)]), tmp_path / "c")
    with pytest.raises(DataError, match=r"data\.val_paths: the glob .* matches no file"):
        prepare_corpus(settings(src, val_paths=[str(tmp_path / "*.nothing")]), tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.val_paths: no readable files"):
        prepare_corpus(settings(src, val_paths=[str(tmp_path / "empty")]), tmp_path / "c")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"data\.val_paths: no documents in"):
        prepare_corpus(settings(src, val_paths=[str(tmp_path / "empty.txt")]), tmp_path / "c")


def test_shard_changed_in_place_or_edited_meta_is_rebuilt(tmp_path, paragraphs, caplog):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:40])
    first = prepare_corpus(settings(src), tmp_path / "cache")
    reference = np.asarray(first.tokens("train")).copy()
    shard = first.dir / "train-00000.bin"
    size = shard.stat().st_size
    shard.write_bytes(bytes(size))  # same size, other bytes: the size check alone would trust it
    with caplog.at_level("WARNING", logger="datamodules.corpus"):
        again = prepare_corpus(settings(src), tmp_path / "cache")
    assert again.report["cache"]["hit"] is False and np.array_equal(np.asarray(again.tokens("train")), reference)
    assert "train-00000.bin was changed in place" in caplog.text
    assert caplog.text.count("rebuilding the entry") == 1  # looked at twice (before and under the lock), said once
    caplog.clear()
    with (again.dir / "val-00000.bin").open("r+b") as f:
        f.truncate(1)
    with caplog.at_level("WARNING", logger="datamodules.corpus"):
        assert prepare_corpus(settings(src), tmp_path / "cache").report["cache"]["hit"] is False
    assert caplog.text.count("a shard is missing or truncated; rebuilding the entry") == 1
    caplog.clear()
    meta = again.dir / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "edited"}))
    with caplog.at_level("WARNING", logger="datamodules.corpus"):
        third = prepare_corpus(settings(src), tmp_path / "cache")
    assert third.report["cache"]["hit"] is False and caplog.text.count("meta.json was edited") == 1
    assert prepare_corpus(settings(src), tmp_path / "cache").report["cache"]["hit"] is True
