"""Text classification data: JSON Lines rows ``{"text": ..., "label": ...}``, batched for a classifier.

Labels are strings (a number or boolean in the file is read as its string, ``1`` -> ``"1"``); the label set is
discovered from the rows (train and val), sorted, and saved with the checkpoint; evaluation passes the
checkpoint's labels instead, and a row whose label is not among them is an error.

An example is BOS, the text's tokens, EOS, truncated to ``seq_len`` tokens (EOS kept, the count in the report).
Batches are right-padded to the longest example of the batch: ``{"input_ids" (B, T), "lengths" (B,),
"labels" (B,)}``; the classifier reads the hidden state of the last real token (``lengths - 1``), which under
causal attention has seen the whole text and no padding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from datamodules.examples import ExampleDataModule, field_of, text_of
from datamodules.sources import CORPORA, DataError
from datamodules.tokenizer import train_tokenizer

EMBEDDED_CLASSIFY = CORPORA / "austen_classify.jsonl.gz"


@dataclass
class _Row:
    where: str
    text: str
    label: str


class LabelledExamples(Dataset):
    def __init__(self, ids: list[np.ndarray], labels: np.ndarray) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ids[i], int(self.labels[i])


@dataclass
class RightPadCollate:
    pad_id: int

    def __call__(self, examples: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)
        input_ids = torch.full((len(examples), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, (ids, _) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.from_numpy(ids)
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"input_ids": input_ids, "lengths": lengths, "labels": labels}


class ClassifyDataModule(ExampleDataModule):
    """Labelled texts for sequence classification.

    Args:
        paths: JSON Lines / JSON files, directories or globs (``.gz`` too); None for the embedded example set
            (passages of Jane Austen's six novels labelled with the novel, ``datamodules/corpora/``).
        val_paths: held-out files; None to hold out ``val_fraction`` of the rows of ``paths``.
        val_fraction: fraction of the rows held out when there are no ``val_paths``.
        text_field, label_field: keys of a row.
        labels: the label set, in class-index order; None to discover it (sorted). Evaluation passes the
            checkpoint's.
        seq_len: tokens per example at most (BOS and EOS included); longer texts are truncated.
        batch_size: examples per batch, per device.
        tokenizer: a ``tokenizer.json``; None: the ``init_from`` checkpoint's (train.py passes it), or, without
            ``init_from``, a byte-level BPE of ``vocab_size`` tokens trained on the train texts.
        skip_empty: drop rows with an empty text instead of stopping with an error.
    """

    kind: ClassVar[str] = "classify"
    embedded: ClassVar[Path] = EMBEDDED_CLASSIFY
    labels: list[str] | None  # the label names in class-index order (None until discovered by prepare())

    def __init__(
        self,
        paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        val_fraction: float = 0.1,
        text_field: str = "text",
        label_field: str = "label",
        labels: list[str] | None = None,
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seed: int = 1234,
        pin_memory: bool = True,
        skip_empty: bool = False,
    ) -> None:
        super().__init__(
            paths, val_paths, val_fraction, seq_len, batch_size, num_workers, tokenizer, seed, pin_memory, skip_empty
        )
        if self.seq_len < 2:
            raise DataError(f"data.seq_len={seq_len} must be at least 2 (BOS and EOS)")
        self.text_field = text_field
        self.label_field = label_field
        self.labels: list[str] | None = None if labels is None else [str(label) for label in labels]
        self.requested_vocab_size = int(vocab_size)

    def _read(self, where: str, record: dict[str, Any]) -> _Row | None:
        text = text_of(record, self.text_field, where, "text_field")
        label = field_of(record, self.label_field, where, "label_field")
        if label is None or isinstance(label, (list, dict)) or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: data.label_field={self.label_field!r} is {label!r}, not a label")
        if not text.strip():
            return self.empty(where, f"text (data.text_field={self.text_field!r})")
        return _Row(where, text, str(label).strip())

    def _rows_read(self, train_rows: list[_Row], val_rows: list[_Row]) -> None:
        if self.labels is None:
            self.labels = sorted({r.label for r in train_rows + val_rows})
            if len(self.labels) < 2:
                raise DataError(
                    f"data.label_field={self.label_field!r}: only one label ({self.labels[0]!r}) in the data; "
                    "a classifier needs at least 2"
                )
            return
        known = set(self.labels)
        for r in train_rows + val_rows:
            if r.label not in known:
                raise DataError(f"{r.where}: label {r.label!r} is not one of the model's labels {self.labels}")

    def _train_tokenizer(self, train_rows: list[_Row]) -> Tokenizer:
        def texts() -> Iterator[str]:
            for r in train_rows:
                yield r.text

        return train_tokenizer(texts(), self.requested_vocab_size)

    def _build(self, rows: list[_Row], split: str) -> tuple[LabelledExamples, dict[str, Any]]:
        index = {label: i for i, label in enumerate(self.labels)}
        encoded = self.tokenizer.encode_batch([r.text for r in rows], add_special_tokens=False)
        keep = self.seq_len - 2
        ids, truncated, tokens = [], 0, 0
        for enc in encoded:
            body = enc.ids
            truncated += len(body) > keep
            example = np.asarray([self.bos_id, *body[:keep], self.eos_id], dtype=np.int64)
            ids.append(example)
            tokens += len(example)
        labels = np.asarray([index[r.label] for r in rows], dtype=np.int64)
        counts = Counter(r.label for r in rows)
        report = {
            "examples": len(rows),
            "truncated": truncated,
            "tokens": tokens,
            "labels": {label: counts.get(label, 0) for label in self.labels},
        }
        return LabelledExamples(ids, labels), report

    def _collate(self) -> RightPadCollate:
        return RightPadCollate(self.pad_id)

    def summary(self) -> str:
        shown = ", ".join(self.labels[:10]) + (", ..." if len(self.labels) > 10 else "")
        return f"{super().summary()}; {len(self.labels)} labels: {shown}"
