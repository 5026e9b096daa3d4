"""The prepared sources of a mixture: one corpus cache entry per source, all tokenized with one tokenizer.

Each source is prepared as :mod:`datamodules.corpus` prepares a corpus (its own cleaning, split, shards and report,
cached by its content and settings), with the tokenizer the mixture shares: ``data.tokenizer`` when given, else one
trained on the train documents of every source together. That tokenizer is a cache entry of its own,
``cache_dir/tokenizer-<key>/``, keyed by the keys the sources would have with a trained tokenizer (their content and
settings), so it is trained once; each source's entry is then keyed by that tokenizer's content like any corpus with
``data.tokenizer`` given. Weights are not part of any key: changing them only changes what is drawn.

A build that trains the tokenizer reads and cleans every source once: all sources are cleaned and split into their
spools first, the tokenizer trained on their train documents, then each source encoded from its spool. The train
documents the tokenizer sees are each source's in proportion to its size, a seeded sample of about
``tokenizer_sample_bytes`` in all when that is set (not in proportion to the weights, so that re-weighting keeps the
cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from datamodules.cache import PIPELINE_VERSION, cache_key, lock, write_json
from datamodules.corpus import (
    CorpusSettings,
    PackedCorpus,
    clean_and_split,
    find_inputs,
    load,
    pack,
    prepare_corpus,
    train_documents,
)
from datamodules.engine import scope
from datamodules.tokenizer import special_ids, train_tokenizer

TOKENIZER_INFO = "tokenizer_info.json"


@scope()  # one Ray start (with data.engine=ray) for every source's build
def prepare_sources(sources: Sequence[tuple[str, CorpusSettings]], cache_dir: str | Path) -> dict[str, PackedCorpus]:
    """Every ``(name, settings)`` source prepared into ``cache_dir`` (or loaded), tokenized alike. The settings'
    ``tokenizer`` is the shared one when given (the same in all), else None in all (trained here)."""
    cache_dir = Path(cache_dir).expanduser()
    given = {s.tokenizer for _, s in sources}
    if len(given) != 1:
        raise ValueError(f"the sources of a mixture share one tokenizer, got {sorted(map(str, given))}")
    if None not in given:
        return {name: prepare_corpus(s, cache_dir) for name, s in sources}
    inputs = {name: find_inputs(s) for name, s in sources}
    keys = {name: cache_key(inputs[name][0], s, inputs[name][2]) for name, s in sources}
    tok_dir = cache_dir / f"tokenizer-{tokenizer_key(keys.values())}"
    built: dict[str, float] = {}
    if _tokenizer_info(tok_dir) is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with lock(cache_dir / ".lock"):
            if _tokenizer_info(tok_dir) is None:  # another process may have built it while we waited
                built = _build_all(sources, inputs, tok_dir, cache_dir)
    tok_file = str(tok_dir / "tokenizer.json")
    # (the entries were just built, or were before: hits; one removed since is rebuilt alone)
    corpora = {name: prepare_corpus(dataclasses.replace(s, tokenizer=tok_file), cache_dir) for name, s in sources}
    for name, seconds in built.items():  # built by this call, not found: say so, as prepare_corpus does
        corpora[name].report["cache"]["hit"] = False
        corpora[name].report["seconds"] = seconds
    return corpora


def tokenizer_key(source_keys: Sequence[str] | Any) -> str:
    """The shared tokenizer's key: the sources' keys with a trained tokenizer (order-free), and the pipeline's
    version."""
    blob = json.dumps({"version": PIPELINE_VERSION, "sources": sorted(source_keys)}).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _tokenizer_info(tok_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((tok_dir / TOKENIZER_INFO).read_text(encoding="utf-8"))
        Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception:  # missing, incomplete or damaged: rebuild
        return None
    return info if info.get("complete") else None


def _build_all(
    sources: Sequence[tuple[str, CorpusSettings]], inputs: dict[str, tuple], tok_dir: Path, cache_dir: Path
) -> dict[str, float]:
    """Clean and split every source, train the shared tokenizer on their train documents, encode every source:
    the tokenizer entry and every source's entry, each renamed into place once complete (we hold the lock).
    Returns the seconds each source's entry took (those built)."""
    built: dict[str, float] = {}
    for stale in cache_dir.glob("*.tmp-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmps: list[Path] = []
    try:
        cleaned = {}
        for name, s in sources:
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=cache_dir))
            tmps.append(tmp)
            files, skipped, val_files, val_skipped = inputs[name]
            cleaned[name] = (tmp, clean_and_split(files, skipped, s, tmp, val_files, val_skipped))
        t0 = time.perf_counter()
        first = sources[0][1]
        tok, info = _train_shared(sources, {n: c for n, (_, c) in cleaned.items()}, first)
        seconds = round(time.perf_counter() - t0, 3)
        tok_tmp = Path(tempfile.mkdtemp(prefix=f"{tok_dir.name}.tmp-", dir=cache_dir))
        tmps.append(tok_tmp)
        tok.save(str(tok_tmp / "tokenizer.json"))
        write_json(tok_tmp / TOKENIZER_INFO, {**info, "seconds": seconds, "complete": True})
        _replace(tok_tmp, tok_dir)
        tok_file = str(tok_dir / "tokenizer.json")
        bos_id, eos_id, pad_id = special_ids(tok)
        tok_info = {"vocab_size": tok.get_vocab_size(), **info, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
        for name, s in sources:
            tmp, c = cleaned[name]
            s2 = dataclasses.replace(s, tokenizer=tok_file)
            files, _, val_files, _ = inputs[name]
            key = cache_key(files, s2, val_files)
            if load(cache_dir / key) is not None:  # the same source (content and settings) in another mixture
                continue
            c.timings["tokenizer"] = seconds
            built[name] = pack(c, s2, tok, tok_info, key, tmp)["seconds"]
            _replace(tmp, cache_dir / key)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    return built


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():  # an incomplete or damaged leftover
        shutil.rmtree(out)
    os.replace(tmp, out)


def _train_shared(
    sources: Sequence[tuple[str, CorpusSettings]], cleaned: dict[str, Any], first: CorpusSettings
) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer trained on the train documents of every source (a proportional sample with
    ``tokenizer_sample_bytes``); and what the report says of it."""
    sample = first.tokenizer_sample_bytes
    train_bytes = {n: c.spool.total_bytes(~c.is_val) for n, c in cleaned.items()}
    total = max(sum(train_bytes.values()), 1)
    used = [0]

    def docs() -> Iterator[str]:
        for name, s in sources:
            c = cleaned[name]
            share = None if sample is None else max(1, round(sample * train_bytes[name] / total))
            yield from train_documents(c.spool, c.is_val, share, s.seed, used)

    tok = train_tokenizer(docs(), first.vocab_size)
    info = {
        "trained": True,
        "source": "trained on the train documents of the mixture's sources: " + ", ".join(n for n, _ in sources),
        "sample_bytes": sample,
        "trained_on_bytes": used[0],
    }
    return tok, info
