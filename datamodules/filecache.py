"""Per-file entries of the data cache: one input file read, cleaned by the per-document rules and summarised once,
then its token ids once per tokenizer. They are the unit that worker processes or Ray tasks prepare in parallel
(:mod:`datamodules.engine`), and what makes a rebuild incremental: a corpus of 100 files with one changed re-reads,
re-cleans and re-encodes that one file.

An entry lives in ``cache_dir/files/<key>/``, the key hashing the file's bytes and every setting that changes what
this step produces from them (reading, ``text_field``, ``split_paragraphs``, the per-document cleaning rules and,
with ``near_dedup``, its signature parameters). It holds:

- ``docs.spool``: the UTF-8 text of the documents that the per-document rules kept, back to back;
- ``docs.npz``: per document, its size in bytes, its length in characters and its 8-byte BLAKE2b digest (what
  exact dedup compares); ``minhash.npy`` its MinHash signature when ``near_dedup`` is configured;
- ``summary.json``: what reading counted (:class:`~datamodules.sources.SourceStats`) and the per-document rules'
  report (documents, characters, dropped / changed / examples per rule);
- ``ids-<tokenizer>.bin`` and ``lens-<tokenizer>.npy``: every spooled document as ``BOS ids EOS`` and its token
  count, per tokenizer (keyed by the tokenizer file's content).

Rules that remember earlier documents (``dedup``, ``near_dedup``) cannot run per file: they run corpus-wide over
these summaries (:mod:`datamodules.merge`), never over the text again. So the configured rules must list them last.
Every entry and file is written under a temporary name and renamed into place once complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer
from tqdm import tqdm

from datamodules import sources
from datamodules.cache import hash_file, write_json
from datamodules.cleaning import STATEFUL_FILTERS, Cleaner, NearDedup
from datamodules.encoding import ENCODE_BATCH_BYTES, available_cpus, encode_with_lengths
from datamodules.sources import DataError, SourceStats, file_format, read_file
from datamodules.spool import Spool, chunks, read_docs

FILE_VERSION = 1  # bump when what an entry holds for given input bytes and settings changes
FILES_DIR = "files"
# Worker processes are worth their start-up (~0.5 s each: imports, the tokenizer) from this much input on.
POOL_MIN_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """What the per-file step does to each file: sent to worker processes, so plain data only."""

    text_field: str
    split_paragraphs: bool
    rules: tuple[dict[str, Any], ...]  # the per-document rules, in order
    minhash: dict[str, Any] | None  # near_dedup's parameters when it is configured: signatures are made per file


def split_rules(rules: Sequence[dict[str, Any]], where: str = "data") -> tuple[list[dict], list[dict]]:
    """``(per_document, corpus_wide)``: the rules that look at one document, and ``dedup`` / ``near_dedup``,
    which must come last (they run over every file's summaries once all files are cleaned)."""
    Cleaner(rules)  # validates names and parameters, naming data.cleaning[i]
    per_doc: list[dict] = []
    tail: list[dict] = []
    for i, spec in enumerate(rules):
        if spec["name"] in STATEFUL_FILTERS:
            tail.append(dict(spec))
        elif tail:
            raise DataError(
                f"{where}.cleaning[{i}]: rule {spec['name']!r} comes after {tail[0]['name']!r}; per-document rules "
                f"run on each file before {' and '.join(STATEFUL_FILTERS)} run over the whole corpus: list it before "
                f"{tail[0]['name']!r}"
            )
        else:
            per_doc.append(dict(spec))
    return per_doc, tail


def file_spec(text_field: str, split_paragraphs: bool, rules: Sequence[dict[str, Any]], where: str) -> FileSpec:
    per_doc, tail = split_rules(rules, where)
    near = next((r for r in tail if r["name"] == "near_dedup"), None)
    minhash = None
    if near is not None:
        nd = NearDedup(**{k: v for k, v in near.items() if k != "name"})
        minhash = {"num_perm": nd.num_perm, "shingle": nd.shingle}
    return FileSpec(text_field, bool(split_paragraphs), tuple(per_doc), minhash)


def file_key(path: Path, spec: FileSpec) -> str:
    """The entry's key: the file's bytes and format, and every setting of the per-file step."""
    payload = {
        "version": FILE_VERSION,
        "format": file_format(path),
        "blake2b": hash_file(path),
        "reading": {"sniff_bytes": sources.SNIFF_BYTES, "max_bad_ratio": sources.MAX_BAD_RATIO},
        **dataclasses.asdict(spec),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def tokenizer_key(tokenizer_path: Path) -> str:
    """Token ids are keyed by the tokenizer file's bytes and the tokenizers version (encoding may change)."""
    blob = f"{hash_file(tokenizer_path)}:{tokenizers.__version__}".encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def digest(doc: str) -> int:
    """The 8-byte content hash that exact dedup compares (as datamodules.cleaning.Dedup hashes)."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------------
# An entry


@dataclasses.dataclass
class FileEntry:
    """A prepared file: its spooled documents and their summaries, in ``dir``. The per-document arrays are read
    from disk at each use, not kept: a build holds every file's entry at once, and the driver's memory must not grow
    with the corpus (24 bytes a document would be 50 MB a GB of text)."""

    dir: Path
    summary: dict[str, Any]
    n_docs: int

    def _array(self, name: str) -> np.ndarray:
        with np.load(self.dir / "docs.npz") as z:
            return z[name]

    @property
    def sizes(self) -> np.ndarray:
        """(docs,) int64: each document's UTF-8 bytes."""
        return self._array("sizes")

    @property
    def chars(self) -> np.ndarray:
        """(docs,) int64: each document's characters."""
        return self._array("chars")

    @property
    def digests(self) -> np.ndarray:
        """(docs,) uint64: each document's content hash (exact dedup's)."""
        return self._array("digests")

    @property
    def spool(self) -> Path:
        return self.dir / "docs.spool"

    def signatures(self) -> np.ndarray:
        """(docs, num_perm) uint32 MinHash signatures (only with near_dedup)."""
        return np.load(self.dir / "minhash.npy")

    def docs(self, which: np.ndarray | None = None) -> Iterator[str]:
        """The spooled documents in order; with ``which`` (bool, one per document), only those marked."""
        sizes = self.sizes
        with open(self.spool, "rb") as f:
            for first, end, offset in chunks(sizes, 1 << 18):
                sel = None if which is None else which[first:end]
                if sel is not None and not sel.any():
                    continue
                for j, doc in enumerate(read_docs(f, offset, sizes[first:end])):
                    if sel is None or sel[j]:
                        yield doc

    def doc(self, i: int) -> str:
        sizes = self.sizes
        with open(self.spool, "rb") as f:
            return read_docs(f, int(sizes[:i].sum()), sizes[i : i + 1])[0]

    def token_ids(self, tok_key: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, lens)``: the documents' token ids back to back (memory-mapped) and each one's count, or None if
        not encoded with that tokenizer yet (or the files do not match)."""
        ids_path, lens_path = self.dir / f"ids-{tok_key}.bin", self.dir / f"lens-{tok_key}.npy"
        try:
            lens = np.load(lens_path)
            n = int(lens.sum())
            if lens.shape != (self.n_docs,) or ids_path.stat().st_size != n * dtype.itemsize:
                return None
        except (OSError, ValueError, EOFError):
            return None
        ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
        return ids, lens


def load_entry(entry_dir: Path) -> FileEntry | None:
    """The entry in ``entry_dir``, or None if missing or incomplete (then it is built again)."""
    try:
        summary = json.loads((entry_dir / "summary.json").read_text(encoding="utf-8"))
        if not summary.get("complete"):
            return None
        with np.load(entry_dir / "docs.npz") as z:
            sizes = z["sizes"]
            if not len(sizes) == len(z["chars"]) == len(z["digests"]):
                return None
        if (entry_dir / "docs.spool").stat().st_size != int(sizes.sum()):
            return None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return FileEntry(entry_dir, summary, len(sizes))


def _build_entry(path: Path, spec: FileSpec, out: Path) -> None:
    """Read, clean (per-document rules), spool and summarise ``path`` into the empty directory ``out``."""
    stats = SourceStats()
    cleaner = Cleaner(list(spec.rules))
    minhash = None if spec.minhash is None else NearDedup(**spec.minhash)
    spool = Spool(out / "docs.spool")
    chars, digests, sigs = [], [], []

    def kept() -> Iterator[str]:
        for doc in cleaner(read_file(path, spec.text_field, spec.split_paragraphs, stats)):
            chars.append(len(doc))
            digests.append(digest(doc))
            if minhash is not None:
                sigs.append(minhash.signature(doc))
            yield doc

    spool.write_all(kept())
    np.savez(
        out / "docs.npz",
        sizes=spool.sizes_array(),
        chars=np.asarray(chars, dtype=np.int64),
        digests=np.asarray(digests, dtype=np.uint64),
    )
    if minhash is not None:
        n = minhash.num_perm
        np.save(out / "minhash.npy", np.stack(sigs) if sigs else np.zeros((0, n), dtype=np.uint32))
    stats_d = dataclasses.asdict(stats)
    write_json(
        out / "summary.json", {"file": str(path), "stats": stats_d, "cleaning": cleaner.report(), "complete": True}
    )


def prepare_file(path: str, spec: FileSpec, files_dir: str, key: str) -> bool:
    """Build the entry ``files_dir/key`` of ``path`` unless it is there; returns whether it was built. Runs in a
    worker process or in this one."""
    out = Path(files_dir) / key
    if load_entry(out) is not None:
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=files_dir))
    try:
        _build_entry(Path(path), spec, tmp)
        if out.exists():  # incomplete leftover
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------------------------------
# Encoding an entry


def encode_entry(entry_dir: str, tokenizer_path: str, tok_key: str, bos_id: int | None, eos_id: int, dtype: str) -> int:
    """Write ``ids-<tok_key>.bin`` and ``lens-<tok_key>.npy`` of the entry (unless there); returns its tokens."""
    entry = load_entry(Path(entry_dir))
    if entry is None:
        raise RuntimeError(f"data cache entry {entry_dir} disappeared while the corpus was being built")
    dt = np.dtype(dtype)
    done = entry.token_ids(tok_key, dt)
    if done is not None:
        return int(done[1].sum())
    tok = _tokenizer(tokenizer_path)
    lens: list[np.ndarray] = []
    ids_path = entry.dir / f"ids-{tok_key}.bin"
    tmp = ids_path.with_name(f"{ids_path.name}.tmp-{os.getpid()}")
    lens_tmp = entry.dir / f"lens-{tok_key}.tmp-{os.getpid()}.npy"
    try:
        sizes = entry.sizes
        with open(entry.spool, "rb") as src, open(tmp, "wb") as dst:
            for first, end, offset in chunks(sizes, ENCODE_BATCH_BYTES):
                docs = read_docs(src, offset, sizes[first:end])
                arr, n = encode_with_lengths(tok, docs, bos_id, eos_id, dt)
                dst.write(arr.tobytes())
                lens.append(n)
        lens_arr = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
        np.save(lens_tmp, lens_arr)
        os.replace(tmp, ids_path)  # ids first: lens is what says an encoding is there, checked against the ids' size
        os.replace(lens_tmp, entry.dir / f"lens-{tok_key}.npy")
    finally:  # interrupted (Ctrl-C, a full disk): no partial file left in the entry
        tmp.unlink(missing_ok=True)
        lens_tmp.unlink(missing_ok=True)
    return int(lens_arr.sum())


_tokenizers: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    if path not in _tokenizers:
        _tokenizers[path] = Tokenizer.from_file(path)
    return _tokenizers[path]


# ---------------------------------------------------------------------------------------------------------
# How many processes run the per-file steps (where they run: datamodules.engine)


def processes(num_proc: int | None, n_files: int, total_bytes: int) -> int:
    """How many processes prepare the files: ``num_proc`` when set; automatic: one per core (at most one per
    file) from :data:`POOL_MIN_BYTES` of input on. Cleaning runs in Python under the GIL, so on two cores two
    processes already clean about twice as fast (``bench/data.py`` measures it)."""
    if num_proc is not None:
        if int(num_proc) < 1:
            raise DataError(f"data.num_proc={num_proc} must be at least 1 (or null for automatic)")
        return max(1, min(int(num_proc), n_files))
    if total_bytes < POOL_MIN_BYTES or n_files < 2:
        return 1
    return max(1, min(available_cpus(), n_files))


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
