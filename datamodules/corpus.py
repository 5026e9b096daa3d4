"""The prepared corpus: cleaned, tokenized and packed into token shards once, then cached by content.

One call of :func:`prepare_corpus` runs the pipeline, each step handing its output to the next:

1. sources -> cleaning: read and clean every document, spooling the kept ones to disk (memory stays bounded);
   with ``val_paths``, their documents too (after the train ones, cleaned by the same rules with their own state);
2. split the documents into train and val with a seeded permutation (by document, never inside one), or, with
   ``val_paths``, val is exactly their documents and train all of ``paths``'s;
3. tokenizer: train it on the train documents (or load the configured one);
4. encode -> shards: every document as ``BOS document EOS`` (:mod:`datamodules.encoding`), appended to its
   split's shards (:mod:`datamodules.shards`).

The result lives in ``cache_dir/<key>/``: ``tokenizer.json``, the shards, ``token_counts.npy`` (how often each
token id occurs in the train split, counted while the shards are written), ``report.json`` and ``meta.json``
(the index: dtype, and every shard's file and token count in order). The key hashes the *content* of every
input file and every setting that changes the output, so an edited file or rule rebuilds and anything else is
a cache hit. The directory is built under a temporary name and renamed into place once complete, and
``meta.json`` (with ``"complete": true``) is written last: a build that crashes, or is killed, never leaves a
directory that a later run trusts; a later build removes its leftovers.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from datamodules.cache import PIPELINE_VERSION, cache_key, checksums, damaged, lock, meta_digest, write_json
from datamodules.cleaning import Cleaner, normalize_rules
from datamodules.corpus_report import build_report
from datamodules.encoding import encode_processes, encode_spool
from datamodules.shards import ShardIndex, ShardWriter, TokenShards, shards_intact, token_dtype
from datamodules.sources import DataError, SourceStats, find_files, read_documents, unread
from datamodules.spool import Spool
from datamodules.tokenizer import load_tokenizer, special_ids, train_tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
TOKEN_COUNTS = "token_counts.npy"  # not part of meta.json: entries without it (built before) stay valid


@dataclass
class CorpusSettings:
    """Everything that decides what :func:`prepare_corpus` produces (besides the input files' bytes), plus
    ``num_proc``, which decides only how fast.

    ``val_paths`` (None: ``val_fraction`` of ``paths``'s documents) are the val split's own sources, read and
    cleaned like ``paths``; ``paths`` may then be empty, for a corpus with a val split only (evaluation).
    """

    paths: Sequence[str]
    text_field: str = "text"
    split_paragraphs: bool = False
    cleaning: list[dict[str, Any]] | None = None  # None: cleaning.DEFAULT_RULES
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one) to load; None: train one
    vocab_size: int = 4096
    tokenizer_sample_bytes: int | None = None
    val_fraction: float = 0.05
    seed: int = 1234
    num_proc: int | None = None  # encoding processes; None: automatic (see encoding.encode_processes)
    val_paths: Sequence[str] | None = None  # the val split's files; None: val_fraction of the documents of paths
    where: str = "data"  # the config node these settings come from, named in errors ("data.sources.web")
    cleaning_rules: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.val_paths = None if self.val_paths is None else [str(p) for p in self.val_paths]
        if not self.paths and not self.val_paths:
            raise DataError(f"{self.where}.paths is empty: give files, directories or globs")
        self.cleaning_rules = normalize_rules(self.cleaning)


@dataclass
class PackedCorpus:
    """A prepared corpus: its tokenizer, where its token shards are, and the report."""

    dir: Path
    tokenizer: Tokenizer
    dtype: np.dtype
    n_train: int
    n_val: int
    report: dict[str, Any]
    index: dict[str, ShardIndex]  # split -> [{"file", "tokens"}, ...] in order
    token_counts: np.ndarray | None = None  # (vocab_size,) int64, of the train split; None: an older entry

    def shards(self, split: str) -> list[tuple[Path, int]]:
        """``(path, tokens)`` of every shard of ``"train"`` or ``"val"``, in order."""
        return [(self.dir / s["file"], int(s["tokens"])) for s in self.index[split]]

    def tokens(self, split: str) -> TokenShards:
        """The token ids of ``"train"`` or ``"val"``: read-only, memory-mapped."""
        return TokenShards(self.shards(split), self.dtype)


def prepare_corpus(settings: CorpusSettings, cache_dir: str | Path) -> PackedCorpus:
    """Build the corpus described by ``settings`` under ``cache_dir``, or load it if already built."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are being imported as the __main__ of a starting worker process: a script that calls this at top
        # level without the `if __name__ == "__main__":` guard. Stop now; the parent encodes in-process instead.
        raise RuntimeError(
            "prepare_corpus() called while a worker process starts: guard the calling script with "
            '`if __name__ == "__main__":`'
        )
    t0 = time.perf_counter()
    files, skipped, val_files, val_skipped = find_inputs(settings)
    key = cache_key(files, settings, val_files)
    cache_dir = Path(cache_dir).expanduser()
    out_dir = cache_dir / key
    corpus = load(out_dir)
    if corpus is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with lock(cache_dir / ".lock"):  # one lock file for the directory, not one left behind per key
            corpus = load(out_dir, warn=False)  # another process may have built it while we waited
            if corpus is None:
                for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a killed build: we hold the lock
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache_dir))
                try:
                    build(files, skipped, settings, key, tmp, val_files, val_skipped)
                    if out_dir.exists():  # an incomplete or damaged leftover
                        shutil.rmtree(out_dir)
                    os.replace(tmp, out_dir)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                corpus = load(out_dir)
                if corpus is None:
                    raise RuntimeError(f"data cache {out_dir} was just written but cannot be read back")
                return corpus  # report as built: hit false, seconds of the build
    corpus.report["cache"] = {"key": key, "hit": True}
    corpus.report["seconds"] = round(time.perf_counter() - t0, 3)
    return corpus


def find_inputs(settings: CorpusSettings) -> tuple[list[Path], list[dict], list[Path] | None, list[dict]]:
    """``(files, skipped, val_files, val_skipped)`` of ``settings.paths`` and ``settings.val_paths`` (None without
    them)."""
    where = settings.where
    files: list[Path] = []
    skipped: list[dict] = []
    if settings.paths:  # empty only with val_paths: no train split
        files, skipped = find_files(settings.paths, key=f"{where}.paths")
        if not files:
            raise DataError(f"{where}.paths: no readable files in {_summary(settings.paths)}")
    val_files: list[Path] | None = None
    val_skipped: list[dict] = []
    if settings.val_paths is not None:
        val_files, val_skipped = find_files(settings.val_paths, key=f"{where}.val_paths")
        if not val_files:
            raise DataError(f"{where}.val_paths: no readable files in {_summary(settings.val_paths)}")
    return files, skipped, val_files, val_skipped


# ---------------------------------------------------------------------------------------------------------
# Building: the pipeline


def build(
    files: list[Path],
    skipped: list[dict],
    settings: CorpusSettings,
    key: str,
    out_dir: Path,
    val_files: list[Path] | None = None,
    val_skipped: Sequence[dict] = (),
) -> dict[str, Any]:
    """Run the pipeline into ``out_dir`` (an empty directory); returns the report. ``val_files``: those of
    ``settings.val_paths`` (None without)."""
    cleaned = clean_and_split(files, skipped, settings, out_dir, val_files, val_skipped)  # 1-2
    t0 = time.perf_counter()
    tok, tok_info = _tokenizer(settings, cleaned.spool, cleaned.is_val)  # 3
    cleaned.timings["tokenizer"] = round(time.perf_counter() - t0, 3)
    return pack(cleaned, settings, tok, tok_info, key, out_dir)  # 4


@dataclass
class Cleaned:
    """Steps 1-2 of a build done: the kept documents spooled in ``out_dir``, split into train and val."""

    sets: list[_SourceSet]
    spool: Spool
    is_val: np.ndarray  # (documents,) bool, in spool order
    val_in_train: int | None
    timings: dict[str, float]


def clean_and_split(
    files: list[Path],
    skipped: list[dict],
    settings: CorpusSettings,
    out_dir: Path,
    val_files: list[Path] | None = None,
    val_skipped: Sequence[dict] = (),
) -> Cleaned:
    """Sources -> cleaning, spooled to ``out_dir`` (the train documents, then those of val_paths), then the split
    by document."""
    t0 = time.perf_counter()
    sets = [_SourceSet("paths", settings.paths, files, skipped)]
    if val_files is not None:
        sets.append(_SourceSet("val_paths", settings.val_paths or [], val_files, list(val_skipped)))
    spool, val_in_train = _read_and_clean(sets, settings, out_dir / "docs.spool")
    if val_files is None:
        is_val = split_documents(sets[0].cleaner.docs_kept, settings.val_fraction, settings.seed)
    else:
        is_val = np.repeat([False, True], [sets[0].cleaner.docs_kept, sets[1].cleaner.docs_kept])
    return Cleaned(sets, spool, is_val, val_in_train, {"read_and_clean": round(time.perf_counter() - t0, 3)})


def pack(
    cleaned: Cleaned, settings: CorpusSettings, tok: Tokenizer, tok_info: dict[str, Any], key: str, out_dir: Path
) -> dict[str, Any]:
    """Encode -> shards with ``tok`` into ``out_dir`` (which holds ``cleaned``'s spool, removed after), then the
    report and ``meta.json`` (last: it marks the entry usable); returns the report."""
    t0 = time.perf_counter()
    spool, is_val = cleaned.spool, cleaned.is_val
    dtype = token_dtype(tok_info["vocab_size"])
    index, n_proc, counts = _encode_to_shards(spool, is_val, tok, tok_info, dtype, settings.num_proc, out_dir)
    np.save(out_dir / TOKEN_COUNTS, counts)
    text_bytes = int(spool.sizes_array().sum())
    spool.path.unlink()
    timings = {**cleaned.timings, "encode_and_pack": round(time.perf_counter() - t0, 3)}

    report = build_report(settings, cleaned.sets, is_val, cleaned.val_in_train, tok_info, dtype, index, n_proc, text_bytes)
    report["cache"] = {"key": key, "hit": False}
    report["settings"] = {k: v for k, v in asdict(settings).items() if k not in ("cleaning", "where")}
    report["timings"] = timings
    report["seconds"] = round(sum(timings.values()), 3)
    write_json(out_dir / "report.json", report)
    meta = {
        "key": key,
        "version": PIPELINE_VERSION,
        "dtype": dtype.name,
        **{f"n_{s}": report["tokens"][s] for s in SPLITS},
    }
    meta = {**meta, "shards": index, "checksums": checksums(out_dir, index, SPLITS), "complete": True}
    write_json(out_dir / "meta.json", {**meta, "meta_blake2b": meta_digest(meta)})  # last: marks it usable
    return report


@dataclass
class _SourceSet:
    """One set of sources (``data.paths`` or ``data.val_paths``) and what reading and cleaning it counted."""

    key: str  # the setting that names them: "paths" or "val_paths"
    paths: Sequence[str]
    files: list[Path]
    skipped: list[dict]
    stats: SourceStats = field(init=False)
    cleaner: Cleaner = field(init=False)

    def docs(self, settings: CorpusSettings, bar: tqdm, done: list[int]) -> Iterator[str]:
        """The cleaned documents; ``done[0]`` holds the bytes that sets before this one read (for the bar)."""
        self.stats = SourceStats(skipped_files=list(self.skipped))
        self.cleaner = Cleaner(settings.cleaning_rules)  # its own state: dedup is per split
        if not self.files:
            return
        docs = read_documents(self.files, settings.text_field, settings.split_paragraphs, self.stats)
        for i, doc in enumerate(self.cleaner(docs)):
            if i % 1024 == 0:
                bar.update(done[0] + self.stats.disk_bytes - bar.n)
            yield doc
        done[0] += self.stats.disk_bytes

    def check(self, settings: CorpusSettings) -> None:
        """A set with no document left is an error naming why."""
        if not self.files:
            return
        cleaner, where = self.cleaner, f"{settings.where}.{self.key}"
        if cleaner.docs_read == 0:
            reasons = unread(self.stats) or [f"empty files, or data.text_field={settings.text_field!r} empty"]
            raise DataError(f"{where}: no documents in {_summary(self.paths)} ({'; '.join(reasons)})")
        if cleaner.docs_kept == 0:
            drops = ", ".join(f"{r.name}: {r.dropped}" for r in cleaner.rules if r.dropped)
            raise DataError(
                f"{settings.where}.cleaning dropped all {cleaner.docs_read} documents of {_summary(self.paths)} ({drops})"
            )


def _digest(doc: str) -> int:
    """The 8-byte content hash that the dedup rule compares (datamodules.cleaning.Dedup)."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _read_and_clean(sets: list[_SourceSet], settings: CorpusSettings, spool_path: Path) -> tuple[Spool, int | None]:
    """Sources -> cleaning -> the spool, set after set; and, with a val set, how many of its documents are also
    train documents (exact copies after cleaning; None without a val set)."""
    spool = Spool(spool_path)
    train_hashes = array.array("Q")  # 8 bytes per train document, only with a val set
    val_in_train = [0]

    def train_docs(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            train_hashes.append(_digest(doc))
            yield doc

    def val_docs(docs: Iterable[str]) -> Iterator[str]:
        # runs once the train documents are all read: the spool is written in order
        seen = np.sort(np.frombuffer(train_hashes, dtype=np.uint64)) if len(train_hashes) else None
        for doc in docs:
            if seen is not None:
                h = np.uint64(_digest(doc))
                i = int(seen.searchsorted(h))
                val_in_train[0] += bool(i < len(seen) and seen[i] == h)
            yield doc

    total = sum(p.stat().st_size for s in sets for p in s.files)
    with progress(total, "reading and cleaning") as bar:
        done = [0]

        def cleaned() -> Iterator[str]:
            train = sets[0].docs(settings, bar, done)
            if len(sets) == 1:
                yield from train
                return
            yield from train_docs(train)
            yield from val_docs(sets[1].docs(settings, bar, done))

        spool.write_all(cleaned())
    for s in sets:
        s.check(settings)
    return spool, (val_in_train[0] if len(sets) > 1 else None)


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


def _tokenizer(settings: CorpusSettings, spool: Spool, is_val: np.ndarray) -> tuple[Tokenizer, dict[str, Any]]:
    """The configured tokenizer, or one trained on the train documents; and what the report says of it."""
    if settings.tokenizer is None and bool(is_val.all()):
        raise DataError("no train documents to train a tokenizer on (a val split only): give data.tokenizer=PATH")
    if settings.tokenizer is not None:
        tok = load_tokenizer(settings.tokenizer)
        info: dict[str, Any] = {"trained": False, "source": str(settings.tokenizer)}
    else:
        used = [0]
        docs = train_documents(spool, is_val, settings.tokenizer_sample_bytes, settings.seed, used)
        tok = train_tokenizer(docs, settings.vocab_size)
        info = {
            "trained": True,
            "source": "trained on the train documents",
            "sample_bytes": settings.tokenizer_sample_bytes,
            "trained_on_bytes": used[0],
        }
    bos_id, eos_id, pad_id = special_ids(tok, name=str(settings.tokenizer))
    return tok, {"vocab_size": tok.get_vocab_size(), **info, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}


def train_documents(
    spool: Spool, is_val: np.ndarray, sample_bytes: int | None, seed: int, used: list[int]
) -> Iterator[str]:
    """The train documents for tokenizer training; with ``sample_bytes``, a seeded random subset of about that
    many bytes spread over the whole corpus rather than its first files. Adds the bytes given to ``used[0]``."""
    sizes = spool.sizes_array()
    keep_p = 1.0
    if sample_bytes is not None:
        total = int(sizes[~is_val].sum())
        keep_p = min(1.0, sample_bytes / max(total, 1))
    rng = np.random.default_rng(seed + 1)
    for i, doc in enumerate(spool.docs()):
        if is_val[i]:
            continue
        if keep_p < 1.0 and rng.random() >= keep_p:
            continue
        used[0] += int(sizes[i])
        yield doc


def _encode_to_shards(
    spool: Spool,
    is_val: np.ndarray,
    tok: Tokenizer,
    tok_info: dict[str, Any],
    dtype: np.dtype,
    num_proc: int | None,
    out_dir: Path,
) -> tuple[dict[str, ShardIndex], int, np.ndarray]:
    """Encode -> shards: every spooled document into its split's shards; the index, processes, train token counts."""
    bos_id, eos_id = tok_info["bos_id"], tok_info["eos_id"]
    text_bytes = int(spool.sizes_array().sum())
    n_proc = encode_processes(num_proc, text_bytes)
    tok_file = out_dir / "tokenizer.json"
    tok.save(str(tok_file))  # before encoding: worker processes load it
    writers = {split: ShardWriter(out_dir, split) for split in SPLITS}
    counts = np.zeros(tok_info["vocab_size"], dtype=np.int64)
    with progress(text_bytes, "encoding") as bar:

        def write(train: np.ndarray, val: np.ndarray, n_bytes: int) -> None:
            # counted here, on arrays already in memory: ~1 ns a token, next to ~1 us a token of encoding
            np.add(counts, np.bincount(train, minlength=len(counts)), out=counts)
            writers["train"].write(train)
            writers["val"].write(val)
            bar.update(n_bytes)

        n_proc = encode_spool(spool, is_val, tok, tok_file, bos_id, eos_id, dtype, n_proc, write)
    return {split: w.close() for split, w in writers.items()}, n_proc, counts


# ---------------------------------------------------------------------------------------------------------
# Loading, locking, progress


def load(out_dir: Path, warn: bool = True) -> PackedCorpus | None:
    """The cached corpus in ``out_dir``, or None if it is missing, incomplete or damaged (then, with ``warn``, one
    warning says why: prepare_corpus looks twice, the second time under the lock, and says it once)."""
    if not (out_dir / "meta.json").is_file():
        return None  # not built yet (or a build was killed before its rename): a plain miss
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        if not meta.get("complete") or meta.get("version") != PIPELINE_VERSION:
            return None
        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        dtype = np.dtype(meta["dtype"])
        index = meta["shards"]
        intact = all(shards_intact(out_dir, index[split], dtype, meta[f"n_{split}"]) for split in SPLITS)
        why = damaged(out_dir, meta) if intact else "a shard is missing or truncated"
    except Exception as err:  # unreadable, truncated or edited by hand: rebuild
        why = f"it cannot be read ({type(err).__name__}: {err})"
    if why:
        if warn:
            logger.warning("data cache %s: %s; rebuilding the entry", out_dir, why)
        return None
    counts = _token_counts(out_dir, tok, meta)
    return PackedCorpus(out_dir, tok, dtype, meta["n_train"], meta["n_val"], report, index, counts)


def _token_counts(out_dir: Path, tok: Tokenizer, meta: dict[str, Any]) -> np.ndarray | None:
    """The train split's token counts; None if the entry has none (older) or others: the entry stays valid."""
    try:
        counts = np.load(out_dir / TOKEN_COUNTS)
    except (OSError, ValueError, EOFError):  # missing, truncated or not an array
        return None
    ok = counts.shape == (tok.get_vocab_size(),) and counts.dtype == np.int64 and int(counts.sum()) == meta["n_train"]
    return counts if ok else None


def _summary(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def progress(total: int | None, desc: str, unit: str = "B") -> tqdm:
    """A progress bar on stderr: on a terminal, for steps of more than two seconds; in a log, only for steps of
    more than a minute, and then at most a line a minute."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        delay=2 if tty else 60,
        mininterval=0.2 if tty else 60,
        leave=False,
        file=sys.stderr,
    )
