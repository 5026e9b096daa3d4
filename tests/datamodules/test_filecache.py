"""The incremental cache: one entry per input file, so changing, adding or removing one file of many re-cleans and
re-encodes that file only, and the corpus built from the entries equals one built from nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules import filecache
from datamodules.corpus import CorpusSettings, prepare_corpus
from datamodules.sources import EMBEDDED_CORPUS, read_file
from datamodules.tokenizer import train_tokenizer

N_FILES = 12


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    paras = (p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True))
    return [p for _, p in zip(range(360), (p for p in paras if len(p) > 40))]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, paragraphs) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(paragraphs, 400).save(str(path))
    return str(path)


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


@pytest.fixture
def corpus_dir(tmp_path, paragraphs) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(N_FILES):
        write_jsonl(root / f"part-{i:02d}.jsonl", paragraphs[i::N_FILES] + paragraphs[:3])  # dedup across files
    return root


def settings(path: Path, tokenizer: str | None) -> CorpusSettings:
    return CorpusSettings(paths=[str(path)], tokenizer=tokenizer, vocab_size=400, val_fraction=0.1, seed=5)


def assert_same(a, b) -> None:
    assert a.report["cache"]["key"] == b.report["cache"]["key"]
    assert a.report["rules"] == b.report["rules"] and a.report["documents"] == b.report["documents"]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(a.tokens(split)), np.asarray(b.tokens(split)))
    assert np.array_equal(a.token_counts, b.token_counts)


def test_one_changed_added_or_removed_file_is_the_only_one_prepared(tmp_path, corpus_dir, paragraphs, tokenizer):
    cache = tmp_path / "cache"
    first = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    assert first.report["files"]["cleaned"] == N_FILES and first.report["files"]["encoded"] == N_FILES

    changed = corpus_dir / "part-05.jsonl"
    write_jsonl(
        changed, ["A new first paragraph, written for this test, long enough to keep."] + paragraphs[5::N_FILES]
    )
    again = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    assert again.report["files"] == {**first.report["files"], "cleaned": 1, "encoded": 1}
    assert_same(again, prepare_corpus(settings(corpus_dir, tokenizer), tmp_path / "fresh-changed"))

    write_jsonl(corpus_dir / "part-99.jsonl", paragraphs[-20:])  # added
    added = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    assert (added.report["files"]["files"], added.report["files"]["cleaned"], added.report["files"]["encoded"]) == (
        N_FILES + 1,
        1,
        1,
    )
    assert_same(added, prepare_corpus(settings(corpus_dir, tokenizer), tmp_path / "fresh-added"))

    (corpus_dir / "part-00.jsonl").unlink()  # removed: every other file's entry is there already
    removed = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    assert (removed.report["files"]["cleaned"], removed.report["files"]["encoded"]) == (0, 0)
    assert_same(removed, prepare_corpus(settings(corpus_dir, tokenizer), tmp_path / "fresh-removed"))


def test_a_trained_tokenizer_retrains_and_reencodes_but_cleans_one_file(tmp_path, corpus_dir, paragraphs):
    cache = tmp_path / "cache"
    prepare_corpus(settings(corpus_dir, None), cache)
    write_jsonl(corpus_dir / "part-03.jsonl", paragraphs[3::N_FILES][1:])
    again = prepare_corpus(settings(corpus_dir, None), cache)
    # the tokenizer is trained on the changed corpus: a new vocabulary, so every file's ids are new
    assert (again.report["files"]["cleaned"], again.report["files"]["encoded"]) == (1, N_FILES)
    assert_same(again, prepare_corpus(settings(corpus_dir, None), tmp_path / "fresh"))


def test_a_damaged_file_entry_is_rebuilt_not_trusted(tmp_path, corpus_dir, tokenizer):
    cache = tmp_path / "cache"
    first = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    entries = sorted((cache / filecache.FILES_DIR).iterdir())
    assert len(entries) == N_FILES
    victim = entries[4]
    (victim / "summary.json").write_text("{not json", encoding="utf-8")
    write_jsonl(corpus_dir / "part-07.jsonl", ["Another paragraph, so that the corpus entry is rebuilt too, long."])
    again = prepare_corpus(settings(corpus_dir, tokenizer), cache)
    assert again.report["files"]["cleaned"] == 2  # the changed file, and the damaged entry
    assert again.report["cache"]["key"] != first.report["cache"]["key"]
    assert_same(again, prepare_corpus(settings(corpus_dir, tokenizer), tmp_path / "fresh"))
