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
    """BLAKE2b of the file's bytes, read in chunks; inside :func:`hashes_remembered`, once per file as it is (device,
    inode, size, modification time)."""
    stamp = None
    if _HASHES is not None:
        st = os.stat(path)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if (known := _HASHES.get(stamp)) is not None:
            return known
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if stamp is not None and _HASHES is not None:
        _HASHES[stamp] = h.hexdigest()
    return h.hexdigest()


_HASHES: dict[tuple, str] | None = None


@contextlib.contextmanager
def hashes_remembered() -> Iterator[None]:
    """Within one build, each input is hashed once, not twice (the corpus's key, then its file's entry's key): on a
    large corpus that is the longest step done in one process. Only within: a file rewritten later, within the
    modification time's granularity and at the same size, must still be hashed again."""
    global _HASHES
    outer = _HASHES
    _HASHES = {} if outer is None else outer
    try:
        yield
    finally:
        _HASHES = outer


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


def meta_digest(meta: dict[str, Any]) -> str:
    """BLAKE2b of a meta.json's content (without its own digest): an edited meta.json is not trusted."""
    return hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=16).hexdigest()


def checksums(out_dir: Path, index: dict[str, Any], splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every shard's BLAKE2b and mtime: load() re-hashes only a shard whose mtime changed (its size: shards_intact)."""
    out = {}
    for split in splits:
        for s in index[split]:
            st = (out_dir / s["file"]).stat()
            out[s["file"]] = {"blake2b": hash_file(out_dir / s["file"]), "mtime_ns": st.st_mtime_ns}
    return out


def damaged(out_dir: Path, meta: dict[str, Any]) -> str | None:
    """Why an entry's meta.json or shards are not what its build wrote (None: they are). Cheap on a cache hit: a
    shard is hashed again only when its mtime differs from the one recorded (written in place, or copied without
    its times); meta.json's own digest is checked every time. (Entries from before the checksums pass.)"""
    if "meta_blake2b" not in meta:
        return None
    body = {k: v for k, v in meta.items() if k != "meta_blake2b"}
    if meta_digest(body) != meta["meta_blake2b"]:
        return "meta.json was edited (its digest does not match)"
    for name, c in meta.get("checksums", {}).items():
        path = out_dir / name
        if path.stat().st_mtime_ns != c["mtime_ns"] and hash_file(path) != c["blake2b"]:
            return f"shard {name} was changed in place (its BLAKE2b does not match)"
    return None


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
