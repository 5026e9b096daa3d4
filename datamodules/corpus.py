"""The prepared corpus: cleaned, tokenized and packed into token shards once, then cached by content.

One call of :func:`prepare_corpus` runs the pipeline, each step handing its output to the next:

1. sources -> cleaning: every file read and cleaned by the per-document rules into its own entry under
   ``cache_dir/files/`` (:mod:`datamodules.filecache`; only the files without one, in worker processes or Ray tasks
   for a large corpus), then ``dedup`` / ``near_dedup`` over all files' summaries (:mod:`datamodules.merge`);
   with ``val_paths``, their documents too (after the train ones, cleaned by the same rules with their own state);
2. split the documents into train and val with a seeded permutation (by document, never inside one), or, with
   ``val_paths``, val is exactly their documents and train all of ``paths``'s;
3. tokenizer: train it on the train documents (or load the configured one);
4. encode -> shards: every file's kept documents as ``BOS document EOS``, once per tokenizer in its entry, then
   copied into its split's shards (:mod:`datamodules.to_shards`, :mod:`datamodules.shards`).

The result lives in ``cache_dir/<key>/``: ``tokenizer.json``, the shards, ``token_counts.npy`` (how often each
token id occurs in the train split, counted while the shards are written), ``report.json`` and ``meta.json``
(the index: dtype, and every shard's file and token count in order). The key hashes the *content* of every
input file and every setting that changes the output, so an edited file or rule rebuilds and anything else is
a cache hit. The directory is built under a temporary name and renamed into place once complete, and
``meta.json`` (with ``"complete": true``) is written last: a build that crashes, or is killed, never leaves a
directory that a later run trusts; a later build removes its leftovers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from datamodules.cache import (
    PIPELINE_VERSION,
    cache_key,
    checksums,
    damaged,
    hashes_remembered,
    lock,
    meta_digest,
    write_json,
)
from datamodules.cleaning import normalize_rules
from datamodules.corpus_report import build_report
from datamodules.engine import check, run_tasks, scope
from datamodules.filecache import (
    FILES_DIR,
    FileEntry,
    FileSpec,
    file_key,
    file_spec,
    load_entry,
    prepare_file,
    processes,
    progress,
)
from datamodules.merge import Merged, merge
from datamodules.shards import ShardIndex, TokenShards, shards_intact, token_dtype
from datamodules.sources import DataError, SourceStats, find_files, unread
from datamodules.to_shards import KeptDocs, encode_to_shards
from datamodules.tokenizer import TOKENIZER_SAMPLE_BYTES, load_tokenizer, special_ids, train_tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
TOKEN_COUNTS = "token_counts.npy"  # not part of meta.json: entries without it (built before) stay valid


@dataclass
class CorpusSettings:
    """Everything that decides what :func:`prepare_corpus` produces (besides the input files' bytes), plus
    ``num_proc`` and ``engine``, which decide only how fast (and are in no cache key).

    ``val_paths`` (None: ``val_fraction`` of ``paths``'s documents) are the val split's own sources, read and
    cleaned like ``paths``; ``paths`` may then be empty, for a corpus with a val split only (evaluation).
    """

    paths: Sequence[str]
    text_field: str = "text"
    split_paragraphs: bool = False
    cleaning: list[dict[str, Any]] | None = None  # None: cleaning.DEFAULT_RULES
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one) to load; None: train one
    vocab_size: int = 4096
    tokenizer_sample_bytes: int | None = TOKENIZER_SAMPLE_BYTES
    val_fraction: float = 0.05
    seed: int = 1234
    num_proc: int | None = None  # cleaning and encoding processes; None: automatic (see filecache.processes)
    engine: str = "local"  # where the per-file steps run: "local" processes or "ray" tasks (datamodules.engine)
    val_paths: Sequence[str] | None = None  # the val split's files; None: val_fraction of the documents of paths
    where: str = "data"  # the config node these settings come from, named in errors ("data.sources.web")
    cleaning_rules: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.val_paths = None if self.val_paths is None else [str(p) for p in self.val_paths]
        if not self.paths and not self.val_paths:
            raise DataError(f"{self.where}.paths is empty: give files, directories or globs")
        self.cleaning_rules = normalize_rules(self.cleaning)
        check(self.engine)


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


@scope()  # a Ray started for the build is shut down after it
def prepare_corpus(settings: CorpusSettings, cache_dir: str | Path) -> PackedCorpus:
    """Build the corpus described by ``settings`` under ``cache_dir``, or load it if already built."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are being imported as the __main__ of a starting worker process: a script that calls this at top
        # level without the `if __name__ == "__main__":` guard. Stop now; the parent encodes in-process instead.
        raise RuntimeError(
            "prepare_corpus() called while a worker process starts: guard the calling script with "
            '`if __name__ == "__main__":`'
        )
    with hashes_remembered():
        return _prepare(settings, cache_dir)


def _prepare(settings: CorpusSettings, cache_dir: str | Path) -> PackedCorpus:
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
    """Steps 1-2 of a build done: every file cleaned into its entry, the corpus-wide rules applied, the kept
    documents split into train and val."""

    sets: list[_SourceSet]
    spool: KeptDocs  # the kept documents of every set, in order
    is_val: np.ndarray  # (documents,) bool, in that order
    val_in_train: int | None
    timings: dict[str, float]
    files: dict[str, int]  # what the per-file step did: {"files", "cleaned", "processes"}


def clean_and_split(
    files: list[Path],
    skipped: list[dict],
    settings: CorpusSettings,
    out_dir: Path,
    val_files: list[Path] | None = None,
    val_skipped: Sequence[dict] = (),
) -> Cleaned:
    """Sources -> cleaning: every file's entry in ``files/`` next to ``out_dir`` (built where missing, in worker
    processes for a large corpus), then the corpus-wide rules per set, then the split by document."""
    t0 = time.perf_counter()
    spec = file_spec(settings.text_field, settings.split_paragraphs, settings.cleaning_rules, settings.where)
    sets = [_SourceSet("paths", settings.paths, files, skipped)]
    if val_files is not None:
        sets.append(_SourceSet("val_paths", settings.val_paths or [], val_files, list(val_skipped)))
    files_dir = out_dir.parent / FILES_DIR
    files_dir.mkdir(exist_ok=True)
    paths = [p for s in sets for p in s.files]
    entries, counts = _prepare_files(paths, spec, files_dir, settings.num_proc, settings.engine)
    for s in sets:
        s.merged = merge([entries[p] for p in s.files], settings.cleaning_rules, s.skipped)
        s.check(settings)
    val_in_train = None
    if val_files is None:
        is_val = split_documents(sets[0].merged.docs_kept, settings.val_fraction, settings.seed)
    else:
        is_val = np.repeat([False, True], [sets[0].merged.docs_kept, sets[1].merged.docs_kept])
        val_in_train = int(np.isin(sets[1].merged.kept_digests(), sets[0].merged.kept_digests()).sum())
    spool = KeptDocs([(e, k) for s in sets for e, k in zip(s.merged.entries, s.merged.keep)])
    timings = {"read_and_clean": round(time.perf_counter() - t0, 3)}
    return Cleaned(sets, spool, is_val, val_in_train, timings, counts)


def _prepare_files(
    paths: list[Path], spec: FileSpec, files_dir: Path, num_proc: int | None, engine: str
) -> tuple[dict[Path, FileEntry], dict[str, int]]:
    """Every file's entry, built where missing (one task per file); and what was done."""
    for stale in files_dir.glob("*.tmp-*"):  # left by a killed build: we hold the cache lock
        shutil.rmtree(stale, ignore_errors=True)
    unique = list(dict.fromkeys(paths))
    keys = {p: file_key(p, spec) for p in unique}
    todo = [p for p in unique if load_entry(files_dir / keys[p]) is None]
    total = sum(p.stat().st_size for p in todo)
    n_proc = processes(num_proc, len(todo), total)
    with progress(total, "reading and cleaning") as bar:
        tasks = [(str(p), spec, str(files_dir), keys[p]) for p in todo]
        n_proc = run_tasks(prepare_file, tasks, n_proc, lambda i, _: bar.update(todo[i].stat().st_size), engine)
    entries = {}
    for p in unique:
        entry = load_entry(files_dir / keys[p])
        if entry is None:
            raise RuntimeError(f"data cache entry {files_dir / keys[p]} of {p} was just written but cannot be read")
        entries[p] = entry
    return entries, {"files": len(unique), "cleaned": len(todo), "clean_processes": n_proc}


def pack(
    cleaned: Cleaned, settings: CorpusSettings, tok: Tokenizer, tok_info: dict[str, Any], key: str, out_dir: Path
) -> dict[str, Any]:
    """Encode -> shards with ``tok`` into ``out_dir`` (each file's entry encoded once per tokenizer), then the
    report and ``meta.json`` (last: it marks the entry usable); returns the report."""
    t0 = time.perf_counter()
    dtype = token_dtype(tok_info["vocab_size"])
    index, n_proc, counts, encoded = encode_to_shards(
        cleaned.spool, cleaned.is_val, tok, tok_info, dtype, settings.num_proc, out_dir, settings.engine
    )
    np.save(out_dir / TOKEN_COUNTS, counts)
    text_bytes = cleaned.spool.total_bytes()
    timings = {**cleaned.timings, "encode_and_pack": round(time.perf_counter() - t0, 3)}

    report = build_report(
        settings, cleaned.sets, cleaned.is_val, cleaned.val_in_train, tok_info, dtype, index, n_proc, text_bytes
    )
    report["files"] = {**cleaned.files, "encoded": encoded, "encode_processes": n_proc}
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
    merged: Merged = field(init=False)

    @property
    def stats(self) -> SourceStats:
        return self.merged.stats

    @property
    def cleaning(self) -> dict[str, Any]:
        return self.merged.cleaning

    def check(self, settings: CorpusSettings) -> None:
        """A set with no document left is an error naming why."""
        if not self.files:
            return
        docs, where = self.cleaning["documents"], f"{settings.where}.{self.key}"
        if docs["read"] == 0:
            reasons = unread(self.stats) or [f"empty files, or data.text_field={settings.text_field!r} empty"]
            raise DataError(f"{where}: no documents in {_summary(self.paths)} ({'; '.join(reasons)})")
        if docs["kept"] == 0:
            drops = ", ".join(f"{n}: {r['dropped']}" for n, r in self.cleaning["rules"].items() if r["dropped"])
            raise DataError(
                f"{settings.where}.cleaning dropped all {docs['read']} documents of {_summary(self.paths)} ({drops})"
            )


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
    order = np.arange(n_docs, dtype=np.int32 if n_docs < 2**31 else np.int64)  # permutation(n_docs), in half the memory
    np.random.default_rng(seed).shuffle(order)
    is_val[order[:n_val]] = True
    return is_val


def _tokenizer(settings: CorpusSettings, spool: KeptDocs, is_val: np.ndarray) -> tuple[Tokenizer, dict[str, Any]]:
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
    spool: KeptDocs, is_val: np.ndarray, sample_bytes: int | None, seed: int, used: list[int]
) -> Iterator[str]:
    """The train documents for tokenizer training; with ``sample_bytes``, a seeded random subset of about that
    many bytes spread over the whole corpus rather than its first files. Adds the bytes given to ``used[0]``."""
    keep_p = 1.0
    if sample_bytes is not None:
        keep_p = min(1.0, sample_bytes / max(spool.total_bytes(~is_val), 1))
    rng = np.random.default_rng(seed + 1)
    i = 0
    for (entry, keep), sizes in zip(spool.parts, spool.sizes()):  # a file at a time: memory stays bounded
        for size, doc in zip(sizes.tolist(), entry.docs(keep)):
            if not is_val[i] and (keep_p >= 1.0 or rng.random() < keep_p):
                used[0] += size
                yield doc
            i += 1


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
