"""LightningModules: the causal language model (pretraining, finetuning) and the sequence classifier.

Both hold a Transformer and add a loss; everything about scale (strategy, precision, devices) is the
Trainer's business. The Transformer is built in ``configure_model`` from a plain config dict, so that under
FSDP Lightning can build it on the meta device, and so that a checkpoint's hyper-parameters rebuild it.
Weights to start from (``init_from``) are loaded by ``load_weights`` after building.

Each module owns its validation metrics (torchmetrics, reduced across ranks): ``validation_step`` feeds them,
``on_validation_epoch_end`` logs a few to TensorBoard and keeps every number in ``validation_results`` before the
reset. ``experiment=eval`` (llm/app/evaluate.py) runs the same validation and writes those numbers to eval.json,
so training's val/* and eval.json cannot disagree on what a loss or an accuracy is.

Every checkpoint carries what is needed to use it alone: the tokenizer (``tokenizer``), the chat template of a
finetuned model (``chat_template``: Jinja for Hugging Face, ``chat_format``: ours, see datamodules/sft.py) and
the classifier's labels (in ``hyper_parameters``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torchmetrics import MeanMetric, Metric, MetricCollection, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat

from llm.core import lora
from llm.core.config import ModelConfig
from llm.core.model import Transformer
from llm.errors import UserError
from llm.training import adapters, parallelize
from llm.training.cross_entropy import IGNORE_INDEX, cross_entropy_and_z
from llm.training.optim import fused_default, loss_scaled, param_groups, splits_matrices
from llm.training.plots import log_confusion

CHECKPOINT_EXTRAS = ("special_tokens", "hf_tokenizer_config")  # a converted checkpoint's, carried along


class TransformerModule(L.LightningModule):
    """What both tasks share: the Transformer, the optimizer and schedule, and what travels in the checkpoint.

    Args:
        model: a ``ModelConfig`` as a dict (its ``vocab_size`` already set from the tokenizer).
        optimizer: a partial optimizer (``conf/optim``), called with the parameter groups.
        scheduler: a partial scheduler (``conf/sched``), called with the optimizer and the run's step count.
        adapter: a ``LoRAConfig`` as a dict (``adapter=lora``): the Transformer's weights are frozen and only the
            adapters (and a classifier's head) train; checkpoints then hold those alone (see ``adapter_base``).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig.from_dict(model)
        self.adapter = None if adapter is None else lora.LoRAConfig.from_dict(adapter)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: Transformer | None = None
        # with adapters: the frozen weights' checkpoint, {"path", "sha256"}, recorded in every adapter checkpoint
        self.adapter_base: dict[str, str] | None = None
        self._parallelized = False
        # the tokenizer travels inside every checkpoint, so a .ckpt alone can be converted, generated from, finetuned
        self.tokenizer_json: str | None = None
        self.chat_format: str | None = None  # our template string (datamodules.sft.ChatTemplate)
        self.chat_template: str | None = None  # the same as Jinja, for Hugging Face's tokenizer_config.json
        self.checkpoint_extras: dict[str, Any] = {}
        # every number of the last validation epoch, as plain Python (see the subclasses' validation_metrics)
        self.validation_results: dict[str, Any] | None = None

    def configure_model(self) -> None:
        if self.model is None:  # idempotent: Lightning may call it again when restoring
            self.model = Transformer(self.config)
            if self.adapter is not None:
                lora.apply(self.model, self.adapter)
                if self.config.compile:
                    adapters.one_graph_per_block(self.model)
        if self._trainer is not None and not self._parallelized:
            if self.adapter is not None:  # the frozen base in bf16 / NF4 on GPU, before sharding or compiling
                adapters.prepare_base(self.model, self.adapter, self.trainer.strategy, self.trainer.precision)  # compile / FSDP, applied from outside the model
            parallelize.apply(self.model, self.config, self.trainer.strategy)
            self._parallelized = True

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a Transformer state dict (names without the ``model.`` prefix, shapes checked) into the model."""
        self.configure_model()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "output.weight" and self.config.tie_embeddings)]
        missing = [k for k in missing if not lora.is_adapter_key(k)]  # new adapters start from their own init
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_json is not None:
            checkpoint["tokenizer"] = self.tokenizer_json
        if self.chat_format is not None:
            checkpoint["chat_format"] = self.chat_format
        if self.chat_template is not None:
            checkpoint["chat_template"] = self.chat_template
        checkpoint.update(self.checkpoint_extras)
        if self.adapter is not None:
            adapters.keep_trainable(self, checkpoint)

    @property
    def strict_loading(self) -> bool:
        # an adapter checkpoint holds the trainable tensors only: the frozen base comes from init_from
        # (adapters.check_resumable checks that the tensors it holds are all the trainable ones)
        return self.adapter is None and self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapter is not None:
            adapters.check_resumable(self, checkpoint)
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)
        self.chat_format = checkpoint.get("chat_format", self.chat_format)
        self.chat_template = checkpoint.get("chat_template", self.chat_template)
        self.checkpoint_extras.update({k: checkpoint[k] for k in CHECKPOINT_EXTRAS if k in checkpoint})
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if callable(getattr(datamodule, "adapt_checkpoint", None)):
            # saved with another world size or batch size: Lightning's batch counters made this run's (order.py)
            datamodule.adapt_checkpoint(checkpoint, getattr(self._trainer, "ckpt_path", None))

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise ValueError(f"{type(self).__name__} needs an optimizer to train (conf/optim)")
        decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        groups = param_groups(self, decay, split_matrices=splits_matrices(self.optimizer_factory))
        # not with a GradScaler (16-mixed): Lightning cannot clip the gradients a fused step unscales itself
        scaled = self._trainer is not None and loss_scaled(self._trainer.precision_plugin)
        fused = {} if scaled else fused_default(self.optimizer_factory, self.parameters())
        optimizer = self.optimizer_factory(groups, **fused)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer, max_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        plugin = self.trainer.precision_plugin
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")  # None means Lightning's default
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaled = loss_scaled(plugin)
        if (
            gradient_clip_val
            and algorithm == GradClipAlgorithmType.NORM
            and not scaled
            and any(hasattr(p, "device_mesh") for p in params)
        ):
            # FSDP2 / tensor parallel: DTensors on more than one mesh, which torch's clip_grad_norm_ cannot sum
            parallelize.clip_grad_norm_(params, gradient_clip_val)
            return
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and not scaled:
            # bf16-mixed has no loss scaler, so the gradients are true ones and clipping them is plain; Lightning's
            # plugin still refuses any fused optimizer (as if a GradScaler had to unscale them first)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class CausalLM(TransformerModule):
    """Next-token prediction with cross-entropy that ignores ``IGNORE_INDEX`` labels (padding, prompts).

    Batches are ``{"input_ids", "labels"}`` of shape (B, T), labels already shifted (label t is token t + 1); packed
    batches add ``positions`` (rotary positions, restarting at 0 per example) and ``segments`` (example ids: attention
    stays inside each example), both (B, T). Arguments as in :class:`TransformerModule`.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, adapter)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # optim.z_loss, set by the experiment when training: the weight of the z-loss term (cross_entropy_and_z)
        self.z_loss = 0.0
        # metric states are not persistent: renaming or adding one leaves checkpoints as they are
        self.val_loss = MeanMetric()  # weighted by the tokens of each batch: the loss per token
        self.val_acc = MulticlassAccuracy(
            num_classes=self.config.vocab_size, average="micro", ignore_index=IGNORE_INDEX
        )
        self.val_tokens = SumMetric().set_dtype(torch.float64)  # a count: exact beyond float32's 2**24
        # bits per byte: the loss of the tokens that stand for text, over the UTF-8 bytes they stand for. Special
        # tokens (EOS, BOS) cover no text and count in neither sum, so two tokenizers compare on the same text
        self.token_bytes: torch.Tensor | None = None  # (vocab,) bytes per token id; set from the DataModule
        self.val_text_nats = SumMetric().set_dtype(torch.float64)
        self.val_text_bytes = SumMetric().set_dtype(torch.float64)
        self.val_by_source = SourceSums()  # batches tagged with a `source` (data=mixture): val/loss/NAME, val/bpb/NAME

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, input_pos=positions, segments=segments)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logits (B, T, V), labels (B, T); mean over the tokens that count (llm/training/cross_entropy.py)
        return cross_entropy_and_z(logits, labels)[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("positions"), batch.get("segments"))
        if not self.z_loss:
            loss = self.loss(logits, batch["labels"])
            self.log("train/loss", loss)  # shown by callbacks.progress.ProgressBar at refresh: no per-step sync
            return loss
        loss, z = cross_entropy_and_z(logits, batch["labels"])
        self.log("train/loss", loss)  # the cross-entropy alone, comparable with runs without z-loss
        self.log("train/z_loss", z)  # unweighted: the mean squared log-partition, comparable across weights
        return loss + self.z_loss * z

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("positions"), batch.get("segments"))
        self.update_validation_metrics(logits, batch["labels"], batch.get("source"))

    def update_validation_metrics(
        self, logits: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> None:
        """Add a batch's logits (B, T, V) against its labels (B, T) to the epoch's metrics; ``source`` (B,): the
        index of each row's data source, measured apart too."""
        n_tokens = (labels != IGNORE_INDEX).sum()
        flat = labels.flatten()
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX, reduction="none")
        total = per_token.sum()  # ignored positions are 0
        nbytes = None
        if self.token_bytes is not None:
            nbytes = self._token_bytes_on(flat.device)[flat.clamp(min=0)] * (flat != IGNORE_INDEX)  # (B*T,)
            self.val_text_nats.update((per_token * (nbytes > 0)).sum())
            self.val_text_bytes.update(nbytes.sum())
        if source is not None:
            self.val_by_source.update(source, per_token.view_as(labels), labels != IGNORE_INDEX, nbytes)
        # sum / count weighted by count is the loss per token whatever the batch split; clamp: a batch without
        # a labelled token (a truncated response) adds 0 with weight 0 instead of the NaN of an empty mean
        self.val_loss.update(total / n_tokens.clamp(min=1), weight=n_tokens)
        self.val_acc.update(logits.flatten(0, 1), labels.flatten())
        self.val_tokens.update(n_tokens)

    def _token_bytes_on(self, device: torch.device) -> torch.Tensor:
        """The bytes table on ``device``, as long as the model's vocabulary (padded ids stand for no text)."""
        table = self.token_bytes
        if table.device != device or table.numel() < self.config.vocab_size:
            padded = torch.zeros(max(self.config.vocab_size, table.numel()), dtype=torch.int64, device=device)
            padded[: table.numel()] = table.to(device)
            self.token_bytes = table = padded
        return table

    def validation_metrics(self) -> dict[str, Any]:
        """Loss per labelled token, perplexity (its exponential), next-token accuracy and the tokens counted;
        bits per byte of text when the bytes per token are known."""
        loss = float(self.val_loss.compute())
        results = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),  # a float64 exponential, finite for any loss a model has
            "accuracy": float(self.val_acc.compute()),
            "tokens": int(self.val_tokens.compute()),
        }
        if self.token_bytes is not None:
            text_bytes = float(self.val_text_bytes.compute())
            results["bpb"] = float(self.val_text_nats.compute()) / (math.log(2) * text_bytes) if text_bytes else None
            results["bytes"] = int(text_bytes)
        by_source = self.val_by_source.compute()  # (S, 4): nats, tokens, text nats, text bytes
        if len(by_source):
            names = getattr(getattr(self._trainer, "datamodule", None), "val_sources", None) or []
            results["sources"] = {
                (names[s] if s < len(names) else str(s)): {
                    "loss": float(nats / tokens) if tokens else None,
                    "bpb": float(text_nats / (math.log(2) * nbytes)) if nbytes else None,
                    "tokens": int(tokens),
                }
                for s, (nats, tokens, text_nats, nbytes) in enumerate(by_source.tolist())
            }
        return results

    def on_validation_epoch_end(self) -> None:
        self.validation_results = results = self.validation_metrics()
        logged = {"val/loss": results["loss"], "val/ppl": results["perplexity"], "val/acc": results["accuracy"]}
        if results.get("bpb") is not None:
            logged["val/bpb"] = results["bpb"]
        self.log_dict(logged, prog_bar=True, sync_dist=False)  # torchmetrics already reduced across ranks
        per_source = {
            f"val/{key}/{name}": value
            for name, r in results.get("sources", {}).items()
            for key, value in (("loss", r["loss"]), ("bpb", r["bpb"]))
            if value is not None
        }
        if per_source:
            self.log_dict(per_source, sync_dist=False)
        sums = (self.val_tokens, self.val_text_nats, self.val_text_bytes, self.val_by_source)
        for metric in (self.val_loss, self.val_acc, *sums):
            metric.reset()


class SourceSums(Metric):
    """Per-source sums of a validation epoch (the sources of ``data=mixture``): a row per window of source index,
    loss (nats), labelled tokens, nats and UTF-8 bytes of the text tokens; concatenated across ranks, added up by
    source in :meth:`compute` as (S, 4) float64 (S: the highest source index seen, plus one)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(
        self, source: torch.Tensor, nats: torch.Tensor, labelled: torch.Tensor, nbytes: torch.Tensor | None
    ) -> None:
        # source (B,), nats and labelled (B, T), nbytes (B*T,) or None
        text = labelled if nbytes is None else (nbytes > 0).view_as(labelled)
        row_bytes = torch.zeros_like(nats) if nbytes is None else nbytes.view_as(labelled).to(nats.dtype)
        columns = (source.to(nats.dtype), nats.sum(1), labelled.sum(1), (nats * text).sum(1), row_bytes.sum(1))
        self.rows.append(torch.stack([c.double() for c in columns], dim=1))  # (B, 5)

    def compute(self) -> torch.Tensor:
        # a list before a distributed sync, one (possibly empty) tensor after it
        rows = dim_zero_cat(self.rows) if isinstance(self.rows, list) and self.rows else self.rows
        if not isinstance(rows, torch.Tensor) or rows.numel() == 0:
            return torch.zeros(0, 4, dtype=torch.float64)
        index = rows[:, 0].long()
        sums = torch.zeros(int(index.max()) + 1, 4, dtype=torch.float64, device=rows.device)
        return sums.index_add_(0, index, rows[:, 1:]).cpu()


class ClassifierHead(nn.Linear):
    """Linear (C -> n_classes) drawn from N(0, std), bias 0; see llm.core.model.Linear for why std is kept."""

    def __init__(self, in_features: int, n_classes: int, std: float) -> None:
        self.std = std
        super().__init__(in_features, n_classes)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        nn.init.zeros_(self.bias)


class SequenceClassifier(TransformerModule):
    """A label per text, read from the final hidden state of its last real (non-padding) token.

    Under causal attention that token has seen the whole text and, with right padding, no padding: no mask is
    needed. The language-model head is kept (the checkpoint stays a complete Transformer, which ``llm.convert``
    and ``llm.generate`` accept) but not used; untied, it is frozen.

    Batches are ``{"input_ids" (B, T), "lengths" (B,), "labels" (B,)}`` (datamodules/classify.py).

    Args:
        model: a ``ModelConfig`` as a dict.
        labels: the class names, in class-index order (saved with the checkpoint).
        label_smoothing: of the training loss (the validation loss is plain cross-entropy).
        optimizer, scheduler, adapter: as in :class:`TransformerModule`.
    """

    def __init__(
        self,
        model: dict[str, Any],
        labels: list[str],
        label_smoothing: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, adapter)
        labels = [str(label) for label in labels]
        if len(labels) < 2:
            raise UserError(f"a classifier needs at least 2 labels, got {labels}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"experiment.label_smoothing={label_smoothing} must be in [0, 1)")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.labels = labels
        self.label_smoothing = float(label_smoothing)
        self.head: ClassifierHead | None = None
        self.dropout = nn.Dropout(self.config.dropout)
        n = len(labels)
        self.val_loss = MeanMetric()  # plain cross-entropy per example
        # named as in eval.json; metrics of one kind of state (the per-class stat scores behind precision, recall
        # and F1) form one compute group, updated and reduced across ranks once
        self.val_metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
                "precision_macro": MulticlassPrecision(num_classes=n, average="macro"),
                "recall_macro": MulticlassRecall(num_classes=n, average="macro"),
                "precision": MulticlassPrecision(num_classes=n, average=None),
                "recall": MulticlassRecall(num_classes=n, average=None),
                "f1": MulticlassF1Score(num_classes=n, average=None),
                "confusion_matrix": MulticlassConfusionMatrix(num_classes=n),  # rows: true, columns: predicted
            }
        )

    def configure_model(self) -> None:
        super().configure_model()
        if self.head is None:
            self.head = ClassifierHead(self.config.dim, len(self.labels), std=self.config.init_std)
            if not self.config.tie_embeddings:
                self.model.output.weight.requires_grad_(False)  # unused: DDP must not wait for its gradient

    def load_head(self, state: dict[str, torch.Tensor]) -> None:
        self.configure_model()
        self.head.load_state_dict(state)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> logits (B, n_classes)."""
        h = self.model.hidden(input_ids)  # (B, T, C)
        last = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, C)
        return self.head(self.dropout(last))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["lengths"])
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        self.log("train/loss", loss)  # shown by callbacks.progress.ProgressBar at refresh: no per-step sync
        self.log("train/acc", (logits.argmax(-1) == batch["labels"]).float().mean())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.update_validation_metrics(self(batch["input_ids"], batch["lengths"]), batch["labels"])

    def update_validation_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch's logits (B, n_classes) against its labels (B,) to the epoch's metrics."""
        self.val_loss.update(F.cross_entropy(logits.float(), labels), weight=labels.numel())
        self.val_metrics.update(logits, labels)

    def validation_metrics(self) -> dict[str, Any]:
        """Loss, accuracy, macro and per-class precision / recall / F1, support, confusion matrix, examples.

        Macro averages are over the classes present in the labels or the predictions (torchmetrics, as
        scikit-learn). Support and examples are read off the confusion matrix (its rows are the true labels), so
        that no second count can disagree with it.
        """
        values = self.val_metrics.compute()
        confusion = values.pop("confusion_matrix").long()
        results: dict[str, Any] = {"loss": float(self.val_loss.compute())}
        results.update({key: float(values[key]) for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro")})
        for key in ("precision", "recall", "f1"):
            results[key] = {label: float(v) for label, v in zip(self.labels, values[key])}
        results["support"] = {label: int(s) for label, s in zip(self.labels, confusion.sum(1))}
        results["labels"] = list(self.labels)
        results["confusion_matrix"] = confusion.tolist()
        results["examples"] = int(confusion.sum())
        return results

    def on_validation_epoch_end(self) -> None:
        self.validation_results = results = self.validation_metrics()
        self.log_dict(
            {"val/loss": results["loss"], "val/acc": results["accuracy"], "val/f1": results["f1_macro"]},
            prog_bar=True,
            sync_dist=False,  # torchmetrics already reduced across ranks
        )
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            confusion = torch.tensor(results["confusion_matrix"])
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    log_confusion(logger, "val/confusion", confusion, self.labels, self.global_step)
        self.val_loss.reset()
        self.val_metrics.reset()
