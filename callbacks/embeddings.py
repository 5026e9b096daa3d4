"""The input embeddings in TensorBoard's Projector tab: the most frequent tokens, labelled with their text.

At the end of training (and every ``every_n_steps`` optimizer steps, when set) the rows of ``tok_embeddings.weight``
of the ``top_k`` most frequent tokens of the training data go to ``SummaryWriter.add_embedding`` under the tag
``tok_embeddings``: TensorBoard reads ``<logdir>/projector_config.pbtxt`` and, per step, ``<step>/tok_embeddings/``
``tensors.tsv`` and ``metadata.tsv`` (columns ``token`` and ``count``), and shows them in 2-D or 3-D by PCA, t-SNE
or UMAP, with a search box and nearest neighbours. Labels: datamodules.tokenizer.token_labels.

Which tokens: the DataModule's ``token_counts`` (pretraining: counted once when the corpus is prepared, kept in the
cache entry; SFT: counted from the train examples), tokens that never occur left out. Where there are none (a
cache entry built before counts were kept, classification and preference data) the first ``top_k`` ids stand in:
with byte-level BPE those are the special tokens, the 256 bytes and the earliest merges, the pairs most frequent
in the tokenizer's training text. Which of the two was used is logged once.

Cost: nothing during training; at a write, the rows gathered (under FSDP2 the embedding is a sharded DTensor and
every rank takes part in ``full_tensor()``) and written as text by rank 0: ~5 MB for 2000 tokens of dimension 256.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from datamodules.tokenizer import token_labels
from llm.errors import UserError

TAG = "tok_embeddings"


def frequent_ids(counts: np.ndarray | None, vocab: int, top_k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The ids of the ``top_k`` most frequent tokens below ``vocab`` (most frequent first, never-seen ones left out),
    and their counts; without counts, the first ``top_k`` ids and None."""
    if counts is None:
        return np.arange(min(top_k, vocab)), None
    counts = np.asarray(counts)[:vocab]
    order = np.argsort(-counts, kind="stable")[:top_k]  # stable: equal counts in id order
    order = order[counts[order] > 0]
    return order, counts[order]


class EmbeddingProjector(L.Callback):
    """Writes the input embeddings of the most frequent tokens for TensorBoard's Projector (see the module doc).

    Args:
        every_n_steps: also write every this many optimizer steps; None: at the end of training only.
        top_k: how many tokens (the Projector computes t-SNE in the browser: a few thousand points stay quick).
    """

    def __init__(self, every_n_steps: int | None = None, top_k: int = 2000) -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise UserError(f"callbacks.embeddings.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if int(top_k) < 1:
            raise UserError(f"callbacks.embeddings.top_k must be >= 1, got {top_k}")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.top_k = int(top_k)
        self._written_step: int | None = None
        self._told = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done (accumulating: the same for several batches)
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._written_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._written_step:
            self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, datamodule = getattr(pl_module, "model", None), trainer.datamodule
        if model is None or datamodule is None or getattr(datamodule, "tokenizer", None) is None:
            return
        self._written_step = trainer.global_step
        weight = model.tok_embeddings.weight.detach()  # (V, C)
        if hasattr(weight, "full_tensor"):  # an FSDP2 shard: a collective, so every rank is here
            weight = weight.full_tensor()
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)] if trainer.is_global_zero else []
        if not loggers:
            return
        tokenizer = datamodule.tokenizer
        vocab = min(weight.shape[0], tokenizer.get_vocab_size())
        ids, counts = frequent_ids(getattr(datamodule, "token_counts", None), vocab, self.top_k)
        if not self._told:
            self._told = True
            how = "the most frequent in the training data" if counts is not None else "the first ids (no token counts)"
            rank_zero_info(f"embeddings: {len(ids)} tokens for the projector, {how}")
        labels = token_labels(tokenizer, ids.tolist())
        metadata: list[Any] = labels if counts is None else [[t, str(int(c))] for t, c in zip(labels, counts)]
        header = None if counts is None else ["token", "count"]
        mat = weight[torch.from_numpy(ids).to(weight.device)].float().cpu()  # (top_k, C)
        for logger in loggers:
            logger.experiment.add_embedding(
                mat, metadata=metadata, metadata_header=header, tag=TAG, global_step=trainer.global_step
            )
