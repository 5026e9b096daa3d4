"""The corpus-wide rules from the files' summaries: exact dedup in memory or by hash partition on disk, near-dedup
from per-file signatures, both equal to the sequential Cleaner over the whole stream; the rule-order error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules import merge
from datamodules.cleaning import Cleaner
from datamodules.corpus import CorpusSettings, prepare_corpus
from datamodules.sources import EMBEDDED_CORPUS, DataError, find_files, read_documents, read_file
from datamodules.tokenizer import load_tokenizer


def reference_duplicates(digests: list[np.ndarray]) -> list[int]:
    seen, out = set(), []
    for g, d in enumerate(np.concatenate(digests).tolist()):
        if d in seen:
            out.append(g)
        seen.add(d)
    return out


@pytest.mark.parametrize("memory_bytes", [None, 16 * 50, 16 * 3, 1])
def test_duplicates_in_memory_and_partitioned_agree_with_a_set(memory_bytes):
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**64, size=300, dtype=np.uint64)  # spread over the top bits: every partition is used
    digests = [pool[rng.integers(0, len(pool), size=n)] for n in (0, 120, 1, 250, 77)]  # an empty file too
    found = merge.duplicates(digests, memory_bytes)
    assert found.dtype == np.int64
    assert found.tolist() == reference_duplicates(digests)


def test_duplicates_of_nothing():
    assert merge.duplicates([], 1).tolist() == [] and merge.duplicates([np.zeros(0, np.uint64)]).tolist() == []


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    paras = (p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True))
    return [p for _, p in zip(range(240), (p for p in paras if len(p) > 60))]


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, paragraphs) -> Path:
    """Six files whose documents repeat across files (exact duplicates) and nearly (one word changed)."""
    root = tmp_path_factory.mktemp("files")
    for i in range(6):
        own = paragraphs[i * 40 : (i + 1) * 40]
        again = paragraphs[(i * 40 + 7) % 200 : (i * 40 + 7) % 200 + 6]  # exact copies of other files' documents
        near = [p.replace(" the ", " a ", 1) for p in paragraphs[(i * 13) % 200 : (i * 13) % 200 + 4]]
        write_jsonl(root / f"part-{i}.jsonl", own + again + near + own[:2])
    return root


def settings(path: Path, rules: list, **kw) -> CorpusSettings:
    base = {"paths": [str(path)], "vocab_size": 400, "val_fraction": 0.1, "seed": 3, "cleaning": rules}
    return CorpusSettings(**{**base, **kw})


def kept_documents(corpus) -> list[str]:
    """Every document of both splits, decoded from the shards (the byte-level BPE round-trips exactly)."""
    tok = load_tokenizer(str(corpus.dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    docs = []
    for split in ("train", "val"):
        ids = np.asarray(corpus.tokens(split)).tolist()
        ends = [i for i, t in enumerate(ids) if t == eos]
        start = 0
        for end in ends:
            doc = ids[start:end]
            assert doc[0] == bos
            docs.append(tok.decode(doc[1:], skip_special_tokens=False))
            start = end + 1
    return docs


def sequential(corpus_dir: Path, rules: list) -> tuple[list[str], dict]:
    """What one Cleaner over the whole stream, file after file, keeps and reports."""
    files, _ = find_files([str(corpus_dir)])
    cleaner = Cleaner(rules)
    kept = list(cleaner(read_documents(files, "text", False)))
    return kept, cleaner.report()


RULES = [{"name": "whitespace"}, {"name": "min_chars", "value": 80}, {"name": "dedup"}]
NEAR = [*RULES, {"name": "near_dedup", "num_perm": 64, "threshold": 0.7}]


@pytest.mark.parametrize("rules", [RULES, NEAR], ids=["dedup", "dedup+near_dedup"])
def test_corpus_wide_rules_equal_the_sequential_cleaner(tmp_path, corpus_dir, rules):
    corpus = prepare_corpus(settings(corpus_dir, rules, num_proc=1), tmp_path / "cache")
    kept, report = sequential(corpus_dir, rules)
    assert sorted(kept_documents(corpus)) == sorted(kept)
    rep = corpus.report
    assert rep["documents"] == report["documents"]
    for name, rule in report["rules"].items():
        assert rep["rules"][name]["dropped"] == rule["dropped"], name
        assert rep["rules"][name]["examples"] == rule["examples"], name  # the same documents, in the same order
    assert rep["rules"]["dedup"]["dropped"] > 20
    if "near_dedup" in rep["rules"]:
        assert rep["rules"]["near_dedup"]["dropped"] > 0


def test_partitioned_dedup_builds_the_same_corpus(tmp_path, corpus_dir, monkeypatch):
    whole = prepare_corpus(settings(corpus_dir, RULES), tmp_path / "memory")
    monkeypatch.setattr(merge, "DEDUP_MEMORY_BYTES", 16 * 8)  # eight documents' digests: dozens of partitions
    parts = prepare_corpus(settings(corpus_dir, RULES), tmp_path / "disk")
    assert parts.report["rules"] == whole.report["rules"]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(parts.tokens(split)), np.asarray(whole.tokens(split)))


def test_a_per_document_rule_after_dedup_is_one_line(tmp_path, corpus_dir):
    rules = [{"name": "dedup"}, {"name": "min_chars", "value": 10}]
    with pytest.raises(DataError) as e:
        prepare_corpus(settings(corpus_dir, rules), tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "data.cleaning[1]" in msg and "'min_chars'" in msg and "'dedup'" in msg
