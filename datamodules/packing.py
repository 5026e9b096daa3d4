"""Packing: clean, tokenize and concatenate a corpus into two memory-mapped token arrays, cached.

One call of :func:`prepare_corpus` runs the whole pipeline, sources -> cleaning -> tokenizer -> packing:

1. read and clean every document, spooling the kept ones to disk (memory stays bounded);
2. split the documents into train and val with a seeded permutation (by document, never inside one);
3. train the tokenizer on the train documents (or load the configured one);
4. encode in batches, append EOS to every document, and append the ids to ``train.bin`` / ``val.bin``.

The result lives in ``cache_dir/<key>/``: ``tokenizer.json``, ``train.bin``, ``val.bin``,
``report.json`` and ``meta.json``. The key hashes the *content* of every input file and every setting
that changes the output, so an edited file or rule rebuilds and anything else is a cache hit.
``meta.json`` (with ``"complete": true``) is written last; the directory is built under a temporary
name and renamed into place, so a crashed build never looks complete.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from datamodules.cleaning import Cleaner, normalize_rules
from datamodules.sources import DataError, SourceStats, file_format, find_files, read_documents
from datamodules.tokenizer import load_tokenizer, special_ids, train_tokenizer

# Bump when the cache layout or anything in the pipeline changes what a given input produces.
PIPELINE_VERSION = 2  # 2: BOS before every document
ENCODE_BATCH_CHARS = 1 << 20  # characters per encode_batch call: enough to keep the Rust threads busy


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b of the file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation documents: ``round(n_docs * val_fraction)`` of them (at least one,
    and at least one left for training), picked by a permutation seeded with ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if n_docs < 2:
        raise DataError(
            f"only {n_docs} document after cleaning: train and val are split by document, so at least 2 are "
            "needed (set data.split_paragraphs=true to make each paragraph a document)"
        )
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


@dataclass
class CorpusSettings:
    """Everything that decides what :func:`prepare_corpus` produces (besides the input files' bytes)."""

    paths: Sequence[str]
    text_field: str = "text"
    split_paragraphs: bool = False
    cleaning: list[dict[str, Any]] | None = None  # None: cleaning.DEFAULT_RULES
    tokenizer: str | None = None  # a tokenizer.json to load; None: train one
    vocab_size: int = 4096
    tokenizer_sample_bytes: int | None = None
    val_fraction: float = 0.05
    seed: int = 1234
    cleaning_rules: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.cleaning_rules = normalize_rules(self.cleaning)


@dataclass
class PackedCorpus:
    """A prepared corpus: its tokenizer, where its token arrays are, and the report."""

    dir: Path
    tokenizer: Tokenizer
    dtype: np.dtype
    n_train: int
    n_val: int
    report: dict[str, Any]

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of ``"train"`` or ``"val"`` as a read-only memory map."""
        n = self.n_train if split == "train" else self.n_val
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))


def cache_key(files: Sequence[Path], settings: CorpusSettings) -> str:
    """Hash of the input files' content (in order, with their format) and of every setting that changes output."""
    inputs = [{"format": file_format(p), "blake2b": hash_file(p)} for p in files]
    tok: dict[str, Any]
    if settings.tokenizer is not None:
        tok = {"file": hash_file(_tokenizer_file(settings.tokenizer))}
    else:
        tok = {
            "vocab_size": settings.vocab_size,
            "sample_bytes": settings.tokenizer_sample_bytes,
            "tokenizers": tokenizers.__version__,
        }
    payload = {
        "version": PIPELINE_VERSION,
        "inputs": inputs,
        "text_field": settings.text_field,
        "split_paragraphs": settings.split_paragraphs,
        "cleaning": settings.cleaning_rules,
        "tokenizer": tok,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"data.tokenizer={path}: no such file")
    return p


def _read_spool(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _train_docs(
    spool: Path, is_val: np.ndarray, sizes: np.ndarray, sample_bytes: int | None, seed: int, used: list[int]
) -> Iterator[str]:
    """The train documents for tokenizer training; with ``sample_bytes``, a seeded random subset of about that
    many bytes spread over the whole corpus rather than its first files. Adds the bytes given to ``used[0]``."""
    keep_p = 1.0
    if sample_bytes is not None:
        total = int(sizes[~is_val].sum())
        keep_p = min(1.0, sample_bytes / max(total, 1))
    rng = np.random.default_rng(seed + 1)
    for i, doc in enumerate(_read_spool(spool)):
        if is_val[i]:
            continue
        if keep_p < 1.0 and rng.random() >= keep_p:
            continue
        used[0] += int(sizes[i])
        yield doc


def _encode_into(
    spool: Path, is_val: np.ndarray, tok: Tokenizer, bos_id: int | None, eos_id: int, dtype: np.dtype, out: dict
) -> dict[str, int]:
    """Encode the spooled documents in batches as BOS doc EOS (Llama's layout), appending to the files in ``out``.

    BOS opens every document, as the tokenizer's post-processor does for a prompt, so generation starts from the
    context the model saw at each document start; EOS closes it, so the model learns where documents end.
    A tokenizer whose BOS is its EOS (GPT-2 style) gets only the EOS.
    """
    counts = {"train": 0, "val": 0}
    batch: list[str] = []
    batch_idx: list[int] = []
    chars = 0

    def flush() -> None:
        encs = tok.encode_batch(batch, add_special_tokens=False)
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        eos = np.array([eos_id], dtype=dtype)
        bos = np.array([bos_id] if bos_id is not None and bos_id != eos_id else [], dtype=dtype)
        for i, enc in zip(batch_idx, encs):
            split = "val" if is_val[i] else "train"
            parts[split].append(bos)
            parts[split].append(np.asarray(enc.ids, dtype=dtype))
            parts[split].append(eos)
        for split, arrs in parts.items():
            if arrs:
                arr = np.concatenate(arrs)
                arr.tofile(out[split])
                counts[split] += len(arr)

    for i, doc in enumerate(_read_spool(spool)):
        batch.append(doc)
        batch_idx.append(i)
        chars += len(doc)
        if chars >= ENCODE_BATCH_CHARS:
            flush()
            batch, batch_idx, chars = [], [], 0
    if batch:
        flush()
    return counts


def _build(files: list[Path], skipped: list[dict], settings: CorpusSettings, key: str, out_dir: Path) -> dict[str, Any]:
    """Run the pipeline into ``out_dir`` (an empty directory); returns the report."""
    t0 = time.perf_counter()
    stats = SourceStats(skipped_files=list(skipped))
    cleaner = Cleaner(settings.cleaning_rules)

    # 1. read + clean, spooled to disk as JSON lines
    spool = out_dir / "docs.jsonl"
    sizes = array.array("q")  # UTF-8 bytes of each kept document (8 bytes a document)
    with open(spool, "w", encoding="utf-8") as f:
        for doc in cleaner(read_documents(files, settings.text_field, settings.split_paragraphs, stats)):
            f.write(json.dumps(doc, ensure_ascii=False))
            f.write("\n")
            sizes.append(len(doc.encode("utf-8")))
    names = ", ".join(settings.paths)
    if cleaner.docs_read == 0:
        raise DataError(
            f"data.paths: no documents in {names} (empty files, or data.text_field={settings.text_field!r} empty)"
        )
    if cleaner.docs_kept == 0:
        drops = ", ".join(f"{r.name}: {r.dropped}" for r in cleaner.rules if r.dropped)
        raise DataError(f"data.cleaning dropped all {cleaner.docs_read} documents of {names} ({drops})")

    t_clean = time.perf_counter()

    # 2. split by document
    is_val = split_documents(cleaner.docs_kept, settings.val_fraction, settings.seed)

    # 3. tokenizer
    if settings.tokenizer is not None:
        tok = load_tokenizer(settings.tokenizer)
        tok_info = {"trained": False, "source": str(settings.tokenizer)}
    else:
        used = [0]
        docs = _train_docs(
            spool, is_val, np.frombuffer(sizes, dtype=np.int64), settings.tokenizer_sample_bytes, settings.seed, used
        )
        tok = train_tokenizer(docs, settings.vocab_size)
        tok_info = {
            "trained": True,
            "source": "trained on the train documents",
            "sample_bytes": settings.tokenizer_sample_bytes,
            "trained_on_bytes": used[0],
        }
    bos_id, eos_id, pad_id = special_ids(tok, name=str(settings.tokenizer))
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    t_tok = time.perf_counter()

    # 4. encode + pack, each array written under a temporary name then renamed
    with open(out_dir / "train.bin.tmp", "wb") as ftrain, open(out_dir / "val.bin.tmp", "wb") as fval:
        counts = _encode_into(spool, is_val, tok, bos_id, eos_id, dtype, {"train": ftrain, "val": fval})
    for split in ("train", "val"):
        os.replace(out_dir / f"{split}.bin.tmp", out_dir / f"{split}.bin")
    spool.unlink()
    tok.save(str(out_dir / "tokenizer.json"))

    clean = cleaner.report()
    report = {
        "sources": {"paths": list(settings.paths), "files": stats.files, "bytes": stats.bytes},
        "documents": clean["documents"],
        "characters": clean["characters"],
        "rules": clean["rules"],
        "invalid_utf8_replacements": stats.invalid_utf8_replacements,
        "skipped_files": stats.skipped_files,
        "split": {
            "train_documents": int((~is_val).sum()),
            "val_documents": int(is_val.sum()),
            "val_fraction": settings.val_fraction,
            "seed": settings.seed,
        },
        "tokens": counts,
        "tokenizer": {"vocab_size": vocab_size, **tok_info, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id},
        "cache": {"key": key, "hit": False},
        "settings": {k: v for k, v in asdict(settings).items() if k != "cleaning"},
        "timings": {
            "read_and_clean": round(t_clean - t0, 3),
            "tokenizer": round(t_tok - t_clean, 3),
            "encode_and_pack": round(time.perf_counter() - t_tok, 3),
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json(out_dir / "report.json", report)
    meta = {
        "key": key,
        "version": PIPELINE_VERSION,
        "dtype": dtype.name,
        "n_train": counts["train"],
        "n_val": counts["val"],
    }
    _write_json(out_dir / "meta.json", {**meta, "complete": True})  # last: marks the directory usable
    return report


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _load(out_dir: Path) -> PackedCorpus | None:
    """The cached corpus in ``out_dir``, or None if it is missing or incomplete."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        if not meta.get("complete") or meta.get("version") != PIPELINE_VERSION:
            return None
        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        dtype = np.dtype(meta["dtype"])
        for split in ("train", "val"):
            if (out_dir / f"{split}.bin").stat().st_size != meta[f"n_{split}"] * dtype.itemsize:
                return None
    except Exception:  # unreadable, truncated or from another version: rebuild
        return None
    return PackedCorpus(out_dir, tok, dtype, meta["n_train"], meta["n_val"], report)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that concurrent processes (DDP ranks) build a cache entry once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_corpus(settings: CorpusSettings, cache_dir: str | Path) -> PackedCorpus:
    """Build the corpus described by ``settings`` under ``cache_dir``, or load it if already built."""
    t0 = time.perf_counter()
    files, skipped = find_files(settings.paths)
    if not files:
        raise DataError(f"data.paths: no readable files in {', '.join(settings.paths)}")
    key = cache_key(files, settings)
    cache_dir = Path(cache_dir).expanduser()
    out_dir = cache_dir / key
    corpus = _load(out_dir)
    if corpus is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _lock(cache_dir / f"{key}.lock"):
            corpus = _load(out_dir)  # another process may have built it while we waited
            if corpus is None:
                tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache_dir))
                try:
                    _build(files, skipped, settings, key, tmp)
                    if out_dir.exists():  # an incomplete leftover
                        shutil.rmtree(out_dir)
                    os.replace(tmp, out_dir)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                corpus = _load(out_dir)
                if corpus is None:
                    raise RuntimeError(f"data cache {out_dir} was just written but cannot be read back")
                return corpus  # report as built: hit false, seconds of the build
    corpus.report["cache"] = {"key": key, "hit": True}
    corpus.report["seconds"] = round(time.perf_counter() - t0, 3)
    return corpus
