"""Pretraining on a weighted mixture of sources (``data=mixture``): named sources, each with its files, weight and
reading settings, drawn by token proportion.

Each source is prepared as a corpus of its own, all with one tokenizer (:mod:`datamodules.mixture_corpus`); an
epoch draws each source's windows in proportion to its weight, repeating a small source and subsampling a large
one (:mod:`datamodules.mixing`), in an order that is a function of the seed and the epoch, so that a resumed run
draws the same sequence (the sampler's position travels in checkpoints, :mod:`datamodules.order`). The val split is
per source (``val_fraction`` of its documents, or its own ``val_paths``), every source's val windows measured whole
and tagged with the source, so the module logs ``val/loss/NAME`` and ``val/bpb/NAME`` next to the overall
``val/loss`` and ``val/bpb`` (which weigh every val token alike).

``data_report.json`` says per source: documents (read, kept, dropped by each rule), tokens available, windows and
tokens used per epoch, repetitions per epoch, and its corpus report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import Dataset

from datamodules.corpus import CorpusSettings, PackedCorpus
from datamodules.dataset import TokenWindows
from datamodules.mixing import MixturePlan, MixtureSampler, SourceWindows, train_windows
from datamodules.mixture_corpus import prepare_sources
from datamodules.pretrain import PretrainDataModule, _plain
from datamodules.sources import DataError
from datamodules.tokenizer import TOKENIZER_SAMPLE_BYTES, special_ids


@dataclass
class SourceSpec:
    """``data.sources.NAME``: a source's files and how to read them; None inherits the mixture's setting."""

    paths: list[str]
    weight: float = 1.0
    text_field: str | None = None  # the JSON key or Parquet column; None: data.text_field
    split_paragraphs: bool | None = None  # None: data.split_paragraphs
    cleaning: list[dict[str, Any]] | None = None  # this source's rules; None: data.cleaning
    val_paths: list[str] | None = None  # its own val set, evaluated whole; None: val_fraction of its documents

    @classmethod
    def parse(cls, name: str, node: Any) -> SourceSpec:
        """``data.sources.NAME`` checked against this schema (keys and types, by OmegaConf): one line naming the key
        at fault."""
        where = f"data.sources.{name}"
        if not isinstance(node, Mapping):
            raise DataError(f"{where}: expected a mapping with paths and weight, got {node!r}")
        node = dict(node)
        for key in ("paths", "val_paths"):
            if isinstance(node.get(key), str):
                node[key] = [node[key]]
        if node.get("paths") is None:
            raise DataError(f"{where}.paths is missing: give files, directories or globs")
        try:
            spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            reason = str(e).strip().splitlines()[0]
            raise DataError(f"{where}{'.' + key if key else ''}: {reason}") from None
        for key in ("paths", "val_paths"):
            if getattr(spec, key) is not None and len(getattr(spec, key)) == 0:
                raise DataError(f"{where}.{key} is empty: give files, directories or globs")
        if not math.isfinite(spec.weight) or spec.weight <= 0:
            raise DataError(f"{where}.weight={spec.weight} must be a positive number")
        return spec


class MixtureDataModule(PretrainDataModule):
    """Causal-LM pretraining on a weighted mixture: train batches as :class:`PretrainDataModule`'s, val batches with
    ``source`` (B,) too, the index of each window's source in :attr:`val_sources`.

    Args:
        sources: ``{NAME: {paths, weight, text_field, split_paragraphs, cleaning, val_paths}}`` (see
            :class:`SourceSpec`); the weights need not add up to 1.
        epoch_tokens: tokens (``seq_len`` per window) drawn per epoch; None: as many as all sources hold together.
        text_field, split_paragraphs, cleaning: the defaults of every source.
        The other arguments are :class:`PretrainDataModule`'s, for every source alike (one tokenizer, trained on the
        train documents of all sources unless given).
    """

    def __init__(
        self,
        sources: dict[str, Any] | None = None,
        epoch_tokens: int | None = None,
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
        train: bool = True,
        document_mask: bool = False,
    ) -> None:
        super().__init__(
            paths=None,
            text_field=text_field,
            split_paragraphs=split_paragraphs,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            tokenizer_sample_bytes=tokenizer_sample_bytes,
            val_fraction=val_fraction,
            seed=seed,
            cleaning=cleaning,
            cache_dir=cache_dir,
            pin_memory=pin_memory,
            num_proc=num_proc,
            engine=engine,
            train=train,
            document_mask=document_mask,
        )
        sources = _plain(sources)
        if not sources:
            raise DataError("data.sources is empty: give at least one source, data.sources.NAME.paths=[...]")
        if not isinstance(sources, Mapping):
            raise DataError(f"data.sources must map names to sources, got {type(sources).__name__}")
        self.sources = {str(name): SourceSpec.parse(str(name), node) for name, node in sources.items()}
        if epoch_tokens is not None and int(epoch_tokens) < seq_len:
            raise DataError(f"data.epoch_tokens={epoch_tokens} is less than one window of data.seq_len={seq_len}")
        self.epoch_tokens = None if epoch_tokens is None else int(epoch_tokens)
        self.corpora: dict[str, PackedCorpus] | None = None
        self.plan: MixturePlan | None = None

    @property
    def val_sources(self) -> list[str]:
        """The sources' names, in the order of the ``source`` index of val batches."""
        return list(self.sources)

    def source_settings(self) -> list[tuple[str, CorpusSettings]]:
        """Every source's corpus settings: its own, else the mixture's."""
        out = []
        for name, spec in self.sources.items():
            settings = CorpusSettings(
                paths=spec.paths,
                text_field=self.text_field if spec.text_field is None else spec.text_field,
                split_paragraphs=self.split_paragraphs
                if spec.split_paragraphs is None
                else bool(spec.split_paragraphs),
                cleaning=self.cleaning if spec.cleaning is None else spec.cleaning,
                tokenizer=self.tokenizer_path,
                vocab_size=self.requested_vocab_size,
                tokenizer_sample_bytes=self.tokenizer_sample_bytes,
                val_fraction=self.val_fraction,
                seed=self.seed,
                num_proc=self.num_proc,
                engine=self.engine,
                val_paths=spec.val_paths,
                where=f"data.sources.{name}",
            )
            out.append((name, settings))
        return out

    def prepare(self) -> None:
        """Prepare (or load) every source, then plan the epochs. Idempotent."""
        if self.corpora is not None:
            return
        corpora = prepare_sources(self.source_settings(), self.cache_dir)
        first = next(iter(corpora.values()))
        window = self.seq_len + 1
        for name, corpus in corpora.items():
            if corpus.n_val < 2:  # every val window is measured whole (padded): one label is enough
                raise DataError(
                    f"data.sources.{name}: {corpus.n_val} validation tokens: raise data.val_fraction or give it"
                    " val_paths"
                )
            if self.train and corpus.n_train < window:
                raise DataError(
                    f"data.sources.{name}: only {corpus.n_train} training tokens, fewer than one window of "
                    f"data.seq_len+1={window}: add data or lower data.seq_len"
                )
        self.tokenizer = first.tokenizer
        self.vocab_size = first.tokenizer.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = special_ids(first.tokenizer, name=str(self.tokenizer_path))
        eos_id = self.eos_id if self.document_mask else None
        trains = [
            TokenWindows(c.shards("train"), c.dtype, c.n_train, self.seq_len, eos_id=eos_id) for c in corpora.values()
        ]
        vals = [
            TokenWindows(c.shards("val"), c.dtype, c.n_val, self.seq_len, tail=True, pad_id=self.pad_id, eos_id=eos_id)
            for c in corpora.values()
        ]
        epoch_windows = None if self.epoch_tokens is None else self.epoch_tokens // self.seq_len
        if self.train:
            weights = [s.weight for s in self.sources.values()]
            self.plan = MixturePlan.build(list(corpora), weights, [len(t) for t in trains], epoch_windows)
        self.train_dataset = train_windows(trains)  # type: ignore[assignment]
        self.val_dataset = SourceWindows(vals)  # type: ignore[assignment]
        self.corpora = corpora
        self.corpus = first  # (what PretrainDataModule's helpers read: the tokenizer's entry)
        self.report = self._report()

    def _report(self) -> dict[str, Any]:
        assert self.corpora is not None
        sources: dict[str, Any] = {}
        plan = self.plan
        for s, (name, corpus) in enumerate(self.corpora.items()):
            spec = self.sources[name]
            entry: dict[str, Any] = {
                "weight": spec.weight,
                "documents": corpus.report["documents"],
                "tokens_available": corpus.n_train,
                "val_tokens": corpus.n_val,
            }
            if plan is not None:
                entry.update(
                    {
                        "share": round(float(plan.shares[s]), 6),
                        "windows_available": int(plan.windows[s]),
                        "windows_per_epoch": int(plan.per_epoch[s]),
                        "tokens_per_epoch": int(plan.per_epoch[s]) * self.seq_len,
                        "repetitions_per_epoch": round(float(plan.repetitions()[s]), 6),
                    }
                )
            entry["cache"] = {"dir": str(corpus.dir), **corpus.report.get("cache", {})}
            entry["corpus"] = corpus.report
            sources[name] = entry
        mixture: dict[str, Any] = {"seq_len": self.seq_len, "seed": self.seed, "epoch_tokens": self.epoch_tokens}
        if plan is not None:
            mixture["windows_per_epoch"] = plan.epoch_windows
            mixture["tokens_per_epoch"] = plan.epoch_windows * self.seq_len
        first = next(iter(self.corpora.values()))
        return {
            "mixture": mixture,
            "sources": sources,
            "tokens": {
                "train": sum(c.n_train for c in self.corpora.values()),
                "val": sum(c.n_val for c in self.corpora.values()),
            },
            "tokenizer": first.report["tokenizer"],
        }

    @property
    def token_counts(self) -> np.ndarray | None:
        """How often each token id occurs in what an epoch draws: each source's train counts times its
        repetitions per epoch."""
        if self.corpora is None or self.plan is None:
            return None
        total = np.zeros(self.vocab_size or 0, dtype=np.float64)
        for s, corpus in enumerate(self.corpora.values()):
            if corpus.token_counts is None:
                return None
            total += corpus.token_counts * float(self.plan.repetitions()[s])
        return np.rint(total).astype(np.int64)

    def tokenizer_source(self) -> Path:
        assert self.corpora is not None
        return next(iter(self.corpora.values())).dir / "tokenizer.json"

    def train_order(self, dataset: Dataset) -> MixtureSampler:
        """The mixture's order for this rank, at the restored position if there is one (see ResumableOrder)."""
        assert self.plan is not None
        rank, world = self.rank_and_world()
        self.train_sampler = MixtureSampler(dataset, self.plan, seed=self.seed, rank=rank, world_size=world)
        if self._pending_state is not None:
            self.train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.train_sampler
