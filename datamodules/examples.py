"""Example sets: JSON rows read, checked, split into train and val, tokenized and batched by a DataModule.

What the example-based DataModules (SFT in :mod:`datamodules.sft`, classification in
:mod:`datamodules.classify`) share. The files are read by :func:`datamodules.sources.read_records`, with the
corpus reader's handling of encodings, byte-order marks, ``.gz`` and files that are not text, and its counts
in the report. A bad row is a one-line :class:`~datamodules.sources.DataError` naming the file and line and the
config key; an empty one is an error too, or a skipped row, counted, with ``data.skip_empty=true``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from datamodules.base import PreparedDataModule
from datamodules.order import ResumableOrder, own_generator
from datamodules.sources import DataError, SourceStats, file_format, find_files, read_records, unread
from datamodules.tokenizer import load_tokenizer, special_ids

EXAMPLE_FORMATS = ("jsonl", "json")


def field_of(record: dict[str, Any], name: str, where: str, key: str) -> Any:
    """``record[name]``, or a one-line error naming the config key, the file and line, and the keys there are."""
    if name not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10])
        raise DataError(f"{where}: no field data.{key}={name!r} (keys: {keys}); set data.{key} to the right name")
    return record[name]


def text_of(record: dict[str, Any], name: str, where: str, key: str) -> str:
    """``record[name]``, which must be a string (see :func:`field_of`)."""
    value = field_of(record, name, where, key)
    if not isinstance(value, str):
        raise DataError(f"{where}: data.{key}={name!r} is {type(value).__name__}, not a string")
    return value


def resolve_paths(paths: Sequence[str] | None, default: Path, key: str = "paths") -> tuple[list[Path], list[dict]]:
    """The files of ``data.<key>`` (files, directories, globs), or the embedded default when None; and the files
    found but not read (hidden, or not ``.jsonl`` / ``.json``), with the reason."""
    if paths is None:
        return [default], []
    found, skipped = find_files(paths, key=f"data.{key}")
    files = [f for f in found if file_format(f) in EXAMPLE_FORMATS]
    skipped += [{"path": str(f), "reason": "unsupported file type"} for f in found if f not in files]
    if not files:
        raise DataError(f"data.{key}={list(paths)}: no .jsonl or .json file (or .gz of them) there")
    return files, skipped


def split_indices(n: int, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: ``round(n * val_fraction)`` examples (at least one each) picked by a seeded permutation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), or give data.val_paths")
    if n < 2:
        raise DataError(
            f"only {n} {what}: at least 2 are needed to hold one out for validation (or give data.val_paths)"
        )
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _plain(value: Any) -> Any:
    """OmegaConf lists (what Hydra passes) as plain lists; a single string as a one-item list."""
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    return [str(v) for v in value]


class ExampleDataModule(ResumableOrder, PreparedDataModule):
    """What the example-based DataModules (SFT, classification) share: files, tokenizer, split, loaders, artefacts.

    Subclasses set ``kind`` and ``embedded`` (the example set used without ``data.paths``), read their rows in
    ``_read`` and turn them into examples in ``_build``; ``prepare()`` does the rest and is idempotent (train.py
    calls it before building the model, whose vocabulary follows the tokenizer).
    """

    embedded: ClassVar[Path]

    def __init__(
        self,
        paths: list[str] | None,
        val_paths: list[str] | None,
        val_fraction: float,
        seq_len: int,
        batch_size: int,
        num_workers: int,
        tokenizer: str | None,
        seed: int,
        pin_memory: bool,
        skip_empty: bool,
    ) -> None:
        super().__init__()
        self.paths = _plain(paths)
        self.val_paths = _plain(val_paths)
        if self.paths is not None and not self.paths:
            raise DataError(
                "data.paths is empty: give .jsonl files, directories or globs (or null for the embedded set)"
            )
        self._set_sizes(seq_len, batch_size, num_workers)
        self.val_fraction = float(val_fraction)
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.skip_empty = bool(skip_empty)
        self._prepared = False

    # ---- reading

    def _read(self, where: str, record: dict[str, Any]) -> Any | None:
        """One row -> an example description, or None to skip it (counted); raise DataError for a bad row."""
        raise NotImplementedError

    def _train_tokenizer(self, train_rows: list[Any]) -> Tokenizer:
        """A tokenizer trained on the train rows, when none is given (subclasses that can train one override this)."""
        raise DataError(
            f"data={self.kind} needs a tokenizer: give init_from=CKPT (its tokenizer is used) or data.tokenizer=PATH"
        )

    def _build(self, rows: list[Any], split: str) -> tuple[Dataset, dict[str, Any]]:
        """Tokenized examples of one split and its report."""
        raise NotImplementedError

    def _collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _read_files(self, key: str, files: list[Path], stats: SourceStats, counts: dict[str, int]) -> list[Any]:
        """The rows of ``files`` (``data.<key>``); reading is counted in ``stats``, rows in ``counts``. No row at
        all is an error naming the files and why (empty, or skipped as not text)."""
        rows, n_read, skipped_before, empty_before = [], 0, len(stats.skipped_files), stats.empty_files
        for where, record in read_records(files, stats):
            n_read += 1
            row = self._read(where, record)
            if row is None:
                counts["skipped_empty"] += 1
            else:
                rows.append(row)
        counts["rows"] += n_read
        if not rows:
            these = SourceStats(empty_files=stats.empty_files - empty_before)
            these.skipped_files = stats.skipped_files[skipped_before:]
            reasons = unread(these) + ([f"all {n_read} rows empty, skipped"] if n_read else []) or ["no rows"]
            raise DataError(f"data.{key}: no {self.kind} examples in {[str(f) for f in files]} ({'; '.join(reasons)})")
        return rows

    def empty(self, where: str, what: str) -> None:
        """An empty example: an error, or a skipped row with data.skip_empty=true."""
        if not self.skip_empty:
            raise DataError(f"{where}: empty {what}; fix the row or set data.skip_empty=true to drop such rows")

    # ---- preparation

    def prepare(self) -> None:
        """Read, split, tokenize. Idempotent."""
        if self._prepared:
            return
        files, skipped = resolve_paths(self.paths, self.embedded)
        stats = SourceStats(skipped_files=skipped)
        counts = {"rows": 0, "skipped_empty": 0}
        rows = self._read_files("paths", files, stats, counts)
        if self.val_paths is not None:
            val_files, val_skipped = resolve_paths(self.val_paths, self.embedded, key="val_paths")
            stats.skipped_files += val_skipped
            val_rows = self._read_files("val_paths", val_files, stats, counts)
            train_rows = rows
        else:
            val_files = []
            train_idx, val_idx = split_indices(len(rows), self.val_fraction, self.seed, f"{self.kind} examples")
            train_rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
        self._rows_read(train_rows, val_rows)

        if self.tokenizer_path is not None:
            tokenizer, source = load_tokenizer(self.tokenizer_path), self.tokenizer_path
        else:
            tokenizer, source = self._train_tokenizer(train_rows), "trained on the train split"
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = special_ids(tokenizer, name=str(self.tokenizer_path))

        self.train_dataset, train_report = self._build(train_rows, "train")
        self.val_dataset, val_report = self._build(val_rows, "val")
        self.report = {
            "kind": self.kind,
            "files": [str(f) for f in files],
            "val_files": [str(f) for f in val_files] if val_files else None,
            "val_split": "data.val_paths" if val_files else f"data.val_fraction={self.val_fraction} (seed {self.seed})",
            **counts,
            "sources": {  # as in the corpus report: what reading saw
                "files": stats.files,
                "bytes": stats.bytes,
                "empty_files": stats.empty_files,
                "skipped_files": len(stats.skipped_files),
            },
            "invalid_utf8_replacements": stats.invalid_utf8_replacements,
            "skipped_files": stats.skipped_files[:100],
            "tokenizer": {"source": source, "vocab_size": self.vocab_size},
            "seq_len": self.seq_len,
            "train": train_report,
            "val": val_report,
        }
        self._prepared = True
        print(self.summary())

    def _rows_read(self, train_rows: list[Any], val_rows: list[Any]) -> None:
        """Hook after reading and splitting, before tokenizing (the classifier discovers its labels here)."""

    def summary(self) -> str:
        r = self.report
        skipped = f", {len(r['skipped_files'])} files skipped" if r["skipped_files"] else ""
        return (
            f"data={self.kind}: {r['train']['examples']} train / {r['val']['examples']} val examples, "
            f"{r['train']['truncated'] + r['val']['truncated']} truncated to data.seq_len={self.seq_len}, "
            f"{r['skipped_empty']} empty rows skipped{skipped} (data_report.json)"
        )

    def tokenizer_source(self) -> Path | Tokenizer:
        if self.tokenizer_path is None:
            return self.tokenizer  # trained here, or the init_from checkpoint's
        source = Path(self.tokenizer_path)
        return source / "tokenizer.json" if source.is_dir() else source

    # ---- loaders

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        settings = {
            "collate_fn": self._collate(),
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        if train:  # shuffled per epoch, sharded over ranks, resumable mid-epoch (datamodules/order.py)
            return self.train_loader(dataset, drop_last=False, **settings)  # small sets keep their last batch
        return DataLoader(dataset, batch_size=self.batch_size, generator=own_generator(self.seed), **settings)

    def train_dataloader(self) -> DataLoader:
        self.prepare()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        self.prepare()
        return self._loader(self.val_dataset, train=False)
