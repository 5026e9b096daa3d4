"""The pretraining DataModule: a cleaned, tokenized, packed corpus served as fixed-length windows.

``prepare()`` does all the work (or loads it from the cache) and is safe to call more than once;
``train.py`` calls it before building the model, whose vocabulary follows the tokenizer. Train windows
are shuffled per epoch and sharded over ranks by :class:`~datamodules.dataset.WindowSampler`, whose
position is saved in checkpoints (:mod:`datamodules.order`); val windows are fixed
and in order, and measure the val split whole: its last, shorter window is padded (labels ignored), and
under several ranks each window is read by one rank exactly once (:class:`~datamodules.dataset.EvenWindows`).
With ``document_mask`` every batch also carries ``segments`` and ``positions``, computed per window from its EOS
tokens (:func:`~datamodules.dataset.document_layout`): the prepared corpus, its cache key, the windows, the order
and the labels are those of a run without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.base import PreparedDataModule
from datamodules.corpus import CorpusSettings, PackedCorpus, prepare_corpus
from datamodules.dataset import EvenWindows, TokenWindows, WindowSampler
from datamodules.engine import check
from datamodules.order import ResumableOrder, own_generator
from datamodules.sources import EMBEDDED_CORPUS, DataError
from datamodules.tokenizer import TOKENIZER_SAMPLE_BYTES, special_ids


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain lists and dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


class PretrainDataModule(ResumableOrder, PreparedDataModule):
    """Causal-LM pretraining data: batches of ``{"input_ids", "labels"}``, both ``(batch_size, seq_len)``; with
    ``document_mask``, ``segments`` and ``positions`` too, of the same shape.

    Args:
        paths: files, directories or globs (``.txt``, ``.jsonl``, ``.json``, and ``.gz`` of each);
            None for the embedded corpus (Jane Austen's novels).
        text_field: the key holding the text in JSON records.
        split_paragraphs: make every paragraph (runs of blank lines) its own document.
        seq_len: tokens per sample.
        batch_size: samples per batch, per device.
        num_workers: DataLoader worker processes.
        tokenizer: a ``tokenizer.json`` to use (or a directory holding one, such as a Hugging Face model
            directory); None trains a byte-level BPE on the corpus.
        vocab_size: size of the trained tokenizer's vocabulary.
        tokenizer_sample_bytes: train the tokenizer on a seeded sample of about this many bytes of the train
            documents when they hold more (None: all of them).
        val_fraction: fraction of the documents held out for validation (unused with ``val_paths``).
        val_paths: files, directories or globs of the val split, read and cleaned as ``paths`` are; None to
            hold out ``val_fraction`` of the documents of ``paths``. With them, no document of ``paths`` is held
            out; the tokenizer is still trained on ``paths`` alone. Exact dedup is per split: a val document
            that is also in train is kept, and counted in the report's ``split.val_in_train``.
        seed: seeds the train/val split and the order of the train windows.
        cleaning: the cleaning rules (see :mod:`datamodules.cleaning`); None for the defaults.
        cache_dir: where prepared corpora are cached.
        pin_memory: pin batches in memory (only when CUDA is available).
        num_proc: processes that clean and encode the corpus, one file per task; None decides by its size and the cores (see
            :func:`datamodules.filecache.processes`). Changes the speed only, never the result.
        engine: where the per-file steps (reading and cleaning, encoding) run: ``"local"``, processes on this
            machine; ``"ray"``, Ray tasks on a local Ray, or on the cluster ``RAY_ADDRESS`` names (see
            :mod:`datamodules.engine`). Changes the speed only, never the result or the cache entry.
        train: False for evaluation only (``experiment=eval`` sets it): no train split is required, and with
            ``val_paths`` ``paths`` is not read at all (the tokenizer must then be given). A training run
            refuses it.
        document_mask: no attention across documents inside a window: batches add ``segments`` (document ids, a
            new one after each EOS, which belongs to the document it ends) and ``positions`` (restarting at 0 at
            each document), int64, for the model's block-diagonal causal mask. Labels, and so the tokens the
            loss counts, are unchanged.
    """

    kind: ClassVar[str] = "text"
    train_dataset: TokenWindows | None
    val_dataset: TokenWindows | None

    def __init__(
        self,
        paths: list[str] | None = None,
        text_field: str = "text",
        split_paragraphs: bool = False,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        tokenizer_sample_bytes: int | None = TOKENIZER_SAMPLE_BYTES,
        val_fraction: float = 0.05,
        seed: int = 1234,
        cleaning: list[dict] | None = None,
        cache_dir: str = ".cache/data",
        pin_memory: bool = True,
        num_proc: int | None = None,
        engine: str = "local",
        val_paths: list[str] | None = None,
        train: bool = True,
        document_mask: bool = False,
    ) -> None:
        super().__init__()
        paths = _plain(paths)
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and len(paths) == 0:
            raise DataError("data.paths is empty: give files, directories or globs (or null for the embedded corpus)")
        val_paths = _plain(val_paths)
        if isinstance(val_paths, str):
            val_paths = [val_paths]
        if val_paths is not None and len(val_paths) == 0:
            raise DataError("data.val_paths is empty: give files, directories or globs (or null for data.val_fraction)")
        self._set_sizes(seq_len, batch_size, num_workers)
        self.paths: list[str] | None = paths
        self.text_field = text_field
        self.split_paragraphs = bool(split_paragraphs)
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.requested_vocab_size = int(vocab_size)
        self.tokenizer_sample_bytes = None if tokenizer_sample_bytes is None else int(tokenizer_sample_bytes)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.cleaning = _plain(cleaning)
        self.cache_dir = str(cache_dir)
        self.pin_memory = bool(pin_memory)
        self.num_proc = None if num_proc is None else int(num_proc)
        self.engine = check(engine)
        self.val_paths: list[str] | None = val_paths
        self.train = bool(train)
        self.document_mask = bool(document_mask)  # batch-time only: not a setting of the prepared corpus
        self.save_hyperparameters(logger=False)

        self.corpus: PackedCorpus | None = None

    # ------------------------------------------------------------------------------------------------
    # preparation

    def prepare(self) -> None:
        """Clean, tokenize and pack the corpus, or load it from the cache. Idempotent."""
        if self.corpus is not None:
            return
        if not self.train and self.val_paths is not None:
            paths: list[str] = []  # evaluation of val_paths: the train sources are not read
        else:
            paths = self.paths if self.paths is not None else [str(EMBEDDED_CORPUS)]
        settings = CorpusSettings(
            paths=paths,
            text_field=self.text_field,
            split_paragraphs=self.split_paragraphs,
            cleaning=self.cleaning,
            tokenizer=self.tokenizer_path,
            vocab_size=self.requested_vocab_size,
            tokenizer_sample_bytes=self.tokenizer_sample_bytes,
            val_fraction=self.val_fraction,
            seed=self.seed,
            num_proc=self.num_proc,
            engine=self.engine,
            val_paths=self.val_paths,
        )
        corpus = prepare_corpus(settings, self.cache_dir)
        window = self.seq_len + 1
        if self.val_paths is None and corpus.n_val < window:
            raise DataError(
                f"data.val_fraction={self.val_fraction} leaves {corpus.n_val} validation tokens, fewer than one "
                f"window of data.seq_len+1={window}: raise data.val_fraction or lower data.seq_len"
            )
        # (val_paths: every document is at least BOS and EOS, so there is at least one label to measure)
        if self.train and corpus.n_train < window:
            raise DataError(
                f"only {corpus.n_train} training tokens in data.paths, fewer than one window of "
                f"data.seq_len+1={window}: add data or lower data.seq_len"
            )
        self.corpus = corpus
        self.tokenizer = corpus.tokenizer
        self.vocab_size = corpus.tokenizer.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = special_ids(corpus.tokenizer, name=str(self.tokenizer_path))
        self.report = corpus.report
        eos_id = self.eos_id if self.document_mask else None  # documents end at EOS (datamodules/encoding.py)
        self.train_dataset = TokenWindows(
            corpus.shards("train"), corpus.dtype, corpus.n_train, self.seq_len, eos_id=eos_id
        )
        self.val_dataset = TokenWindows(
            corpus.shards("val"), corpus.dtype, corpus.n_val, self.seq_len, tail=True, pad_id=self.pad_id, eos_id=eos_id
        )

    @property
    def token_counts(self) -> np.ndarray | None:
        """The train split's token counts, kept in the cache entry. An entry built before they were kept is counted
        here once, from its memory-mapped shards (a bincount per shard: 3.4 s per 200M tokens
        measured here), rather
        than rebuilt or left without counts."""
        if self.corpus is None:
            return None
        if self.corpus.token_counts is None:
            train = self.corpus.tokens("train")
            counts = np.zeros(self.corpus.tokenizer.get_vocab_size(), dtype=np.int64)
            for i in range(len(train.paths)):
                shard = np.bincount(train.shard(i), minlength=len(counts))
                counts[: len(shard)] += shard[: len(counts)]
            self.corpus.token_counts = counts
        return self.corpus.token_counts

    def tokenizer_source(self) -> Path:
        assert self.corpus is not None
        return self.corpus.dir / "tokenizer.json"

    # ------------------------------------------------------------------------------------------------
    # dataloaders

    def _loader_settings(self) -> dict[str, Any]:
        if self.num_workers > 0:
            # the tokenizer's threads were used in this process; workers only read the memory map
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        if not self.train:
            raise DataError("data.train=false prepares data for evaluation only: a training run needs data.train=true")
        self.prepare()
        assert self.train_dataset is not None
        loader = self.train_loader(self.train_dataset, **self._loader_settings())
        if len(self.train_sampler) < self.batch_size:
            raise DataError(
                f"{len(self.train_dataset)} train windows over {self.train_sampler.num_replicas} rank(s) are fewer"
                f" than data.batch_size={self.batch_size}: lower data.batch_size or data.seq_len"
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        self.prepare()
        assert self.val_dataset is not None
        rank, world = self.rank_and_world()
        # every window once over the ranks: rank r reads windows r, r + world, ...; empty windows even them out
        dataset = self.val_dataset if world == 1 else EvenWindows(self.val_dataset, world)
        sampler = WindowSampler(dataset, shuffle=False, rank=rank, world_size=world)
        # val keeps its last, partial batch
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, generator=own_generator(self.seed),
            **self._loader_settings(),
        )  # fmt: skip
