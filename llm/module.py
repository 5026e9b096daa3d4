"""LightningModules: the causal language model (pretraining and finetuning).

The module holds the Transformer and the loss; everything about scale (strategy, precision, devices) is
the Trainer's business. The model is built in ``configure_model`` from a plain config dict, so that under
FSDP Lightning can build it on the meta device, and so that a checkpoint's hyper-parameters rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from llm.config import ModelConfig
from llm.model import Transformer

IGNORE_INDEX = -100


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on the weight matrices of attention and MLP only.

    Norm gains and biases are not decayed (pulling a gain towards 0 changes what the layer computes, not
    its complexity). The token embedding is not decayed either: decoupled decay shrinks every row at every
    step, while a rare token's row only receives gradient when the token occurs, so decay would steadily
    erase rare tokens (OLMo 2 drops embedding decay for the same reason). With tied embeddings the output
    head is that same tensor and follows the same choice.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CausalLM(L.LightningModule):
    """Next-token prediction with cross-entropy that ignores ``IGNORE_INDEX`` labels (padding, prompts).

    Args:
        model: a ``ModelConfig`` as a dict (its ``vocab_size`` already set from the tokenizer).
        optimizer: a partial optimizer (``conf/optim``), called with the parameter groups.
        scheduler: a partial scheduler (``conf/sched``), called with the optimizer and the run's step count.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.config = ModelConfig.from_dict(model)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: Transformer | None = None
        # the tokenizer travels inside every checkpoint, so a .ckpt alone can be converted, generated from, finetuned
        self.tokenizer_json: str | None = None
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(
            num_classes=self.config.vocab_size, average="micro", ignore_index=IGNORE_INDEX
        )

    def configure_model(self) -> None:
        if self.model is None:  # idempotent: Lightning may call it again when restoring
            self.model = Transformer(self.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits (B, T, V), labels (B, T); mean over the tokens that count
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])
        loss = self.loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        logits = self(batch["input_ids"])
        n_tokens = (labels != IGNORE_INDEX).sum()
        # token-weighted mean, so that val/loss is the loss per token whatever the batch split
        self.val_loss.update(self.loss(logits, labels), weight=n_tokens)
        self.val_acc.update(logits.flatten(0, 1), labels.flatten())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"val/loss": loss, "val/ppl": torch.exp(loss), "val/acc": self.val_acc.compute()},
            prog_bar=True,
            sync_dist=False,  # torchmetrics already reduced across ranks
        )
        self.val_loss.reset()
        self.val_acc.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_json is not None:
            checkpoint["tokenizer"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError("CausalLM needs an optimizer to train (conf/optim)")
        groups = param_groups(self.model, self.optimizer_factory.keywords.get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, max_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
