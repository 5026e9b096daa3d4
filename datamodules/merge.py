"""The corpus-wide cleaning steps, run over the per-file summaries (:mod:`datamodules.filecache`), never the text.

Once every file of a set (``data.paths``, or ``data.val_paths``) is cleaned by the per-document rules, ``dedup``
and ``near_dedup`` run over the documents of all files in order, as they would over one stream: a document is
dropped if its digest (or MinHash signature) matches one kept before it. The result is a keep mask per file and
the set's cleaning report, counts and examples in the same form as :class:`datamodules.cleaning.Cleaner`'s.

Exact dedup alone (the default) is done by hash partition with bounded memory: while the digests fit
:data:`DEDUP_MEMORY_BYTES` they are sorted in memory; beyond, they are spread by their top bits over partition
files on disk and each partition is sorted alone (the same partitioning spreads the work over machines).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.cleaning import EXAMPLE_CHARS, MAX_EXAMPLES, STATEFUL_FILTERS
from datamodules.filecache import FileEntry
from datamodules.sources import SourceStats

# Digests (8 bytes) and positions (8 bytes) of this many bytes are sorted in memory (about 2.5x that at the peak);
# more go through partitions on disk, each about this size: the driver's memory stays what it is for a small corpus.
DEDUP_MEMORY_BYTES = 8 << 20
MAX_PARTITION_BITS = 8  # at most 256 partitions (two open files each); beyond 2 GiB of digests they grow instead


@dataclasses.dataclass
class Merged:
    """One set of files after the corpus-wide rules: which documents each file keeps, and what cleaning counted."""

    entries: list[FileEntry]
    keep: list[np.ndarray]  # per entry, (docs,) bool
    stats: SourceStats
    cleaning: dict[str, Any]  # {"documents": ..., "characters": ..., "rules": ...}, as Cleaner.report()

    @property
    def docs_kept(self) -> int:
        return int(sum(int(k.sum()) for k in self.keep))

    def kept_digests(self) -> np.ndarray:
        parts = [e.digests[k] for e, k in zip(self.entries, self.keep)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def duplicates(digests: Sequence[np.ndarray], memory_bytes: int | None = None) -> np.ndarray:
    """Global positions (sorted) of the documents whose digest occurred at an earlier position; ``digests`` are
    the files' arrays in order (each may be read from disk as it is indexed: it is read twice, one at a time)."""
    budget = DEDUP_MEMORY_BYTES if memory_bytes is None else memory_bytes
    n = sum(len(d) for d in digests)
    if n * 16 <= budget:
        flat = np.concatenate(list(digests)) if len(digests) else np.zeros(0, dtype=np.uint64)
        return _duplicates_in(flat, np.arange(n, dtype=np.int64))
    bits = min(MAX_PARTITION_BITS, max(1, math.ceil(math.log2(n * 16 / budget))))
    shift = np.uint64(64 - bits)
    found = []
    with tempfile.TemporaryDirectory(prefix="dedup-") as tmp:
        files = [(open(Path(tmp) / f"{p}.d", "wb"), open(Path(tmp) / f"{p}.i", "wb")) for p in range(1 << bits)]
        try:
            start = 0
            for d in digests:  # file by file: memory is one file's digests
                part = d >> shift
                order = np.argsort(part, kind="stable")
                bounds = np.searchsorted(part[order], np.arange((1 << bits) + 1, dtype=np.uint64))
                for p in range(1 << bits):
                    sel = order[bounds[p] : bounds[p + 1]]
                    if len(sel):
                        files[p][0].write(d[sel].tobytes())
                        files[p][1].write((sel + start).astype(np.int64).tobytes())
                start += len(d)
        finally:
            for fd, fi in files:
                fd.close()
                fi.close()
        for p in range(1 << bits):  # a partition at a time: about memory_bytes
            d = np.fromfile(Path(tmp) / f"{p}.d", dtype=np.uint64)
            idx = np.fromfile(Path(tmp) / f"{p}.i", dtype=np.int64)
            found.append(_duplicates_in(d, idx))
    return np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def _duplicates_in(d: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The positions ``idx`` (ascending) whose digest ``d`` occurs at a smaller position."""
    order = np.argsort(d, kind="stable")  # stable: equal digests stay in position order, the first one first
    ds = d[order]
    repeat = np.flatnonzero(ds[1:] == ds[:-1]) + 1
    return np.sort(idx[order[repeat]])


def merge(entries: list[FileEntry], rules: Sequence[dict[str, Any]], skipped: Sequence[dict]) -> Merged:
    """Apply the corpus-wide rules of ``rules`` (the tail: dedup / near_dedup) over ``entries`` in order."""
    tail = [r for r in rules if r["name"] in STATEFUL_FILTERS]
    keep = [np.ones(e.n_docs, dtype=bool) for e in entries]
    starts = np.cumsum([0] + [e.n_docs for e in entries])
    dropped: dict[str, np.ndarray] = {}  # per rule, the global positions it dropped, ascending
    if [r["name"] for r in tail] == ["dedup"]:
        dropped["dedup"] = duplicates(_Digests(entries))
    elif tail:
        dropped = {name: np.asarray(g, dtype=np.int64) for name, g in _sequential(entries, tail).items()}
    for g in dropped.values():
        f = np.searchsorted(starts, g, side="right") - 1  # the file of each position
        for i in np.unique(f).tolist():
            keep[i][g[f == i] - starts[i]] = False
    return Merged(entries, keep, _stats(entries, skipped), _cleaning(entries, keep, rules, dropped, starts))


class _Digests(Sequence[np.ndarray]):
    """The files' digests, read from their entries as they are indexed: never all in memory at once."""

    def __init__(self, entries: list[FileEntry]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):  # type: ignore[override]
        return self.entries[i].digests


def _sequential(entries: list[FileEntry], tail: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Dedup and near-dedup in the configured order over every document, from digests and signatures."""
    filters = []
    for r in tail:
        params = {k: v for k, v in r.items() if k != "name"}
        filters.append((r["name"], STATEFUL_FILTERS[r["name"]](**params)))
    dropped: dict[str, list[int]] = {name: [] for name, _ in filters}
    g = 0
    for e in entries:
        sigs = e.signatures() if any(name == "near_dedup" for name, _ in filters) else None
        for i, key in enumerate(e.digests.tolist()):
            for name, f in filters:
                ok = f.admit(key) if name == "dedup" else f.admit(sigs[i])  # type: ignore[index]
                if not ok:
                    dropped[name].append(g)
                    break
            g += 1
    return dropped


def _stats(entries: list[FileEntry], skipped: Sequence[dict]) -> SourceStats:
    total = SourceStats(skipped_files=list(skipped))
    for e in entries:
        s = e.summary["stats"]
        for f in ("files", "bytes", "documents", "invalid_utf8_replacements", "empty_files", "disk_bytes"):
            setattr(total, f, getattr(total, f) + int(s[f]))
        total.skipped_files.extend(s["skipped_files"])
    return total


def _examples(entries: list[FileEntry], starts: np.ndarray, positions: np.ndarray) -> Iterator[str]:
    for g in positions[:MAX_EXAMPLES].tolist():
        f = int(np.searchsorted(starts, g, side="right")) - 1
        text = entries[f].doc(int(g - starts[f]))
        yield text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."


def _cleaning(
    entries: list[FileEntry],
    keep: list[np.ndarray],
    rules: Sequence[dict[str, Any]],
    dropped: dict[str, np.ndarray],
    starts: np.ndarray,
) -> dict[str, Any]:
    """The set's cleaning report: the files' per-document counts added up, the corpus-wide rules' own."""
    read = sum(int(e.summary["cleaning"]["documents"]["read"]) for e in entries)
    chars_read = sum(int(e.summary["cleaning"]["characters"]["read"]) for e in entries)
    kept = sum(int(k.sum()) for k in keep)
    chars_kept = sum(int(e.chars[k].sum()) for e, k in zip(entries, keep))
    report: dict[str, Any] = {}
    for r in rules:
        name = r["name"]
        if name in dropped:
            report[name] = {
                "dropped": len(dropped[name]),
                "changed": 0,
                "examples": list(_examples(entries, starts, dropped[name])),
            }
            continue
        per_file = [e.summary["cleaning"]["rules"][name] for e in entries]
        examples = [x for p in per_file for x in p["examples"]][:MAX_EXAMPLES]
        report[name] = {
            "dropped": sum(int(p["dropped"]) for p in per_file),
            "changed": sum(int(p["changed"]) for p in per_file),
            "examples": examples,
        }
    return {
        "documents": {"read": read, "kept": kept, "dropped": read - kept},
        "characters": {"read": chars_read, "kept": chars_kept},
        "rules": report,
    }
