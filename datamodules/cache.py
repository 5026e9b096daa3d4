"""The corpus cache: the key of a prepared corpus (the content of its inputs and every setting that changes the
output), and the file lock and atomic writes that keep one entry whole when several processes build it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from datamodules import sources
from datamodules.sources import DataError, file_format
from datamodules.tokenizer import tokenizer_file

if TYPE_CHECKING:
    from datamodules.corpus import CorpusSettings

# Bump when the cache layout or anything in the pipeline changes what a given input produces.
PIPELINE_VERSION = 3  # 2: BOS before every document; 3: sharded arrays, binary files skipped


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b of the file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _inputs(files: Sequence[Path]) -> list[dict[str, str]]:
    inputs = []
    for p in files:
        try:
            inputs.append({"format": file_format(p), "blake2b": hash_file(p)})
        except OSError as e:
            raise DataError(f"{p}: cannot be read ({e.strerror or e})") from None
    return inputs


def cache_key(files: Sequence[Path], settings: CorpusSettings, val_files: Sequence[Path] | None = None) -> str:
    """Hash of the input files' content (in order, with their format; ``val_files`` those of ``val_paths``) and of
    every setting that changes output."""
    inputs = _inputs(files)
    tok: dict[str, Any]
    if settings.tokenizer is not None:
        tok = {"file": hash_file(tokenizer_file(settings.tokenizer))}
    else:
        tok = {"vocab_size": settings.vocab_size, "sample_bytes": settings.tokenizer_sample_bytes}
    payload = {
        "version": PIPELINE_VERSION,
        "inputs": inputs,
        "reading": {"sniff_bytes": sources.SNIFF_BYTES, "max_bad_ratio": sources.MAX_BAD_RATIO},
        "text_field": settings.text_field,
        "split_paragraphs": settings.split_paragraphs,
        "cleaning": settings.cleaning_rules,
        "tokenizer": tok,
        "tokenizers": tokenizers.__version__,  # training and encoding may change between versions
        "val_fraction": settings.val_fraction if val_files is None else None,  # unused with val_paths
        "seed": settings.seed,
    }
    if val_files is not None:  # (absent otherwise: the keys of corpora without val_paths stay what they were)
        payload["val_inputs"] = _inputs(val_files)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that concurrent processes (DDP ranks) build a cache entry once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
