"""Packing: BOS and EOS per document, dtype, split by document, and the content-keyed cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from datamodules.packing import CorpusSettings, prepare_corpus, split_documents, token_dtype
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


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


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
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
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
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


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
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left behind
