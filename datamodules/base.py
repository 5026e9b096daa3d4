"""What every DataModule here shares: the contract the rest of the trainer reads, an idempotent ``prepare()``
behind Lightning's hooks, and the artefacts it leaves in the run directory (``tokenizer.json``,
``data_report.json``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from datamodules.sources import DataError
from datamodules.tokenizer import token_bytes


class PreparedDataModule(L.LightningDataModule):
    """A DataModule whose data is prepared once, and what the trainer reads from every one of them.

    Subclasses set ``kind``, implement ``prepare()`` (idempotent: train.py calls it before building the model,
    whose vocabulary follows the tokenizer, and Lightning's hooks call it again) and fill the attributes below
    there, and say where their tokenizer is in ``tokenizer_source()``. Per kind, a DataModule declares more:
    ``labels`` (classify: the label names in class-index order) and ``template`` (sft: the chat template, a
    :class:`datamodules.sft.ChatTemplate`, saved with the checkpoint).
    """

    # which data this is, and so which LightningModule and evaluation go with it: "text" (pretraining on a
    # packed corpus), "sft" (chat / instruction examples) or "classify" (labelled texts)
    kind: ClassVar[str]

    # set by __init__ (what the configuration asks for)
    seq_len: int  # tokens per example at most (the model's context must hold it)
    batch_size: int  # examples per batch, per device

    # set by prepare()
    tokenizer: Tokenizer | None  # what the data was tokenized with; the model's vocabulary follows it
    vocab_size: int | None  # tokenizer.get_vocab_size()
    bos_id: int  # the tokenizer's special tokens (see datamodules.tokenizer.special_ids); -1 before prepare()
    eos_id: int
    pad_id: int
    report: dict[str, Any]  # what preparing read, dropped and built: data_report.json
    train_dataset: Dataset | None
    val_dataset: Dataset | None

    @property
    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of text per token id (vocab_size,), 0 for special tokens: val/bpb's denominator. Counted
        once per tokenizer, after prepare()."""
        if self.tokenizer is None:
            raise RuntimeError("token_bytes is known after prepare()")
        if getattr(self, "_token_bytes", None) is None or self._token_bytes_of is not self.tokenizer:
            self._token_bytes = torch.from_numpy(token_bytes(self.tokenizer))
            self._token_bytes_of = self.tokenizer
        return self._token_bytes

    @property
    def token_counts(self) -> np.ndarray | None:
        """How often each token id occurs in the train split, (vocab_size,) int64; None where the data keeps no
        counts (callbacks/embeddings.py then falls back to the first ids). Cheap to read: counted when the data
        is prepared (pretraining: with the shards, in the cache) or from examples already in memory."""
        return None

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = None
        self.vocab_size = None
        self.bos_id = self.eos_id = self.pad_id = -1
        self.report = {}
        self.train_dataset = None
        self.val_dataset = None

    def _set_sizes(self, seq_len: int, batch_size: int, num_workers: int) -> None:
        """Check and keep ``seq_len``, ``batch_size`` and ``num_workers`` (DataLoader worker processes)."""
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if int(value) < 1:
                raise DataError(f"data.{name}={value} must be positive")
        if int(num_workers) < 0:
            raise DataError(f"data.num_workers={num_workers} must be >= 0")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)

    def prepare(self) -> None:
        raise NotImplementedError

    def tokenizer_source(self) -> Path | Tokenizer:
        """The ``tokenizer.json`` the data was tokenized with, or the tokenizer itself when it has no file."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def save_artifacts(self, run_dir: str | Path) -> None:
        """Write ``tokenizer.json`` and ``data_report.json`` into ``run_dir``."""
        self.prepare()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / "tokenizer.json"
        source = self.tokenizer_source()
        if not (isinstance(source, Path) and target.exists() and source.samefile(target)):
            tmp = target.with_name(f".tokenizer.{os.getpid()}.json")
            if isinstance(source, Path):
                shutil.copyfile(source, tmp)
            else:
                source.save(str(tmp))
            tmp.replace(target)  # atomic: other ranks may write the same file
        with open(run_dir / "data_report.json", "w", encoding="utf-8") as f:
            json.dump(self.report, f, indent=2, ensure_ascii=False)
            f.write("\n")
