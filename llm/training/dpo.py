"""Preference tuning: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on pairs of answers to one prompt.

The policy is the language model being trained; the reference is the policy it started from, frozen. For an answer
y to a prompt x, log pi(y | x) is the sum over y's tokens (and its EOS) of log p(token); the pair's score is

    delta = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))

and the losses, per pair, as TRL computes them (``dpo.loss``):

- ``sigmoid`` (DPO): -(1 - ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta), ``ls = dpo.label_smoothing``
  (> 0: conservative DPO, which assumes that a fraction ls of the preferences are flipped);
- ``ipo``: (delta' - 1 / (2 beta))^2, delta' from log-probabilities averaged over each answer's tokens (the
  length normalisation TRL applies, confirmed with IPO's authors, so that beta means the same at any length).

The implicit rewards are beta (log pi - log ref) per answer; logged as TRL names them: ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (the fraction of pairs whose chosen reward is the higher),
``rewards/margins`` (chosen minus rejected), and ``logps/chosen``, ``logps/rejected`` (the policy's summed
log-probabilities), under ``train/`` each step and ``val/`` per validation (torchmetrics, reduced across ranks).

The reference policy, without a second copy where there can be none:

- with LoRA adapters (``adapter=lora``): the policy itself with its adapters disabled (``llm.core.lora.disabled``),
  which computes exactly the frozen base;
- otherwise a frozen copy of the Transformer taken when the init weights are loaded (``freeze_reference``). It is
  deliberately not a submodule: it then has no keys in the state dict, so checkpoints do not hold it and resuming
  (also from a sharded FSDP checkpoint, whose reader wants every key of the state dict) does not ask for it; it is
  moved and cast with the module (``_apply``) and, under ``trainer=fsdp``, sharded as the policy is.

Both sides of the pairs run through the policy in one forward, concatenated on the batch axis (chosen first), and
through the reference in a second one, without gradients and in eval mode (no dropout: at step 0 the rewards are
0 and the sigmoid loss is log 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric

from llm.core import lora
from llm.core.model import Transformer
from llm.errors import UserError
from llm.training import checkpoint, parallelize
from llm.training.module import IGNORE_INDEX, CausalLM

LOSSES = ("sigmoid", "ipo")
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def check_settings(beta: float, label_smoothing: float, loss: str) -> None:
    """Refuse, in one line naming the ``dpo.*`` key, settings the losses are not defined for."""
    if loss not in LOSSES:
        raise UserError(f"dpo.loss={loss!r} must be one of {', '.join(LOSSES)}")
    if not beta > 0:
        raise UserError(f"dpo.beta={beta} must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
    if label_smoothing and loss != "sigmoid":
        raise UserError(f"dpo.label_smoothing={label_smoothing} applies to dpo.loss=sigmoid only (got {loss})")


# ------------------------------------------------------------------------------------------------------ the maths


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the sum of log p(label) over the labelled tokens (N,) and how many there are (N,).

    logits (N, T, V), labels (N, T) shifted, IGNORE_INDEX off the answer; log-probabilities in float32.
    """
    N, T, _ = logits.shape
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(N, T).sum(-1), (labels != IGNORE_INDEX).sum(-1)  # ignored positions contribute 0


def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each pair (B,), from log pi - log ref of each side (B,) (see the module docstring).

    IPO averages the log-ratios over the answers' tokens: ``chosen_tokens`` and ``rejected_tokens`` (B,).
    """
    if loss == "ipo":
        delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    if loss != "sigmoid":
        raise ValueError(f"unknown preference loss {loss!r} (one of {LOSSES})")
    delta = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def pair_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one forward's input ids and labels (2B, T): the chosen sides, then the rejected ones."""
    if "input_ids" in batch:  # joined by the collate (datamodules/preference.py)
        return batch["input_ids"], batch["labels"]
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    return ids, torch.cat([batch["chosen_labels"], batch["rejected_labels"]])


@dataclass
class PairStats:
    """What one batch of B pairs gives: the loss and the numbers logged, per pair (B,)."""

    loss: torch.Tensor  # with gradient
    chosen_rewards: torch.Tensor  # beta (log pi - log ref), detached
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # log pi, summed over the answer, detached
    rejected_logps: torch.Tensor

    def per_pair(self) -> dict[str, torch.Tensor]:
        """TRL's metrics (PAIR_METRICS), each per pair (B,); their means are what is logged."""
        return {
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float(),
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "logps/chosen": self.chosen_logps,
            "logps/rejected": self.rejected_logps,
        }


# ----------------------------------------------------------------------------------------------------- the module


class PreferenceLM(CausalLM):
    """A causal language model trained on preference pairs (``datamodules/preference.py`` batches).

    Args:
        model, optimizer, scheduler, adapter: as in :class:`llm.training.module.TransformerModule`.
        beta: ``dpo.beta``, the strength of the pull towards the reference (the KL penalty's weight).
        label_smoothing: ``dpo.label_smoothing`` (sigmoid loss only).
        loss: ``dpo.loss``, ``"sigmoid"`` (DPO) or ``"ipo"``.
        reference: the reference's checkpoint (saved with the hyper-parameters, so that evaluation finds it).

    Call :meth:`freeze_reference` after loading the init weights (``llm/app/experiments.py`` does), or
    :meth:`load_reference` with other weights.
    """

    def __init__(
        self,
        model: dict[str, Any],
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss: str = "sigmoid",
        reference: str | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        check_settings(beta, label_smoothing, loss)
        super().__init__(model, optimizer=optimizer, scheduler=scheduler, adapter=adapter)  # saves the arguments
        self.beta, self.label_smoothing, self.loss_type = float(beta), float(label_smoothing), loss
        self.reference_path = reference
        self.__dict__["_reference"] = None  # a frozen Transformer, or None: the adapters disabled (see the docstring)
        self._reference_parallelized = False
        # val_loss (CausalLM's MeanMetric) is the mean loss per pair; these the mean of each PAIR_METRICS per pair
        self.val_pair_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in PAIR_METRICS})
        self.val_pairs = SumMetric().set_dtype(torch.float64)

    # ---- the reference policy

    @property
    def reference(self) -> nn.Module | None:
        """The frozen copy, or None when the reference is the model with its adapters disabled."""
        return self.__dict__["_reference"]

    def has_adapters(self) -> bool:
        self.configure_model()
        return lora.has_adapters(self.model)

    def freeze_reference(self) -> None:
        """Take the weights loaded now as the reference: with adapters, the base under them (nothing to copy);
        otherwise a frozen copy of the Transformer."""
        if self.has_adapters():
            self.__dict__["_reference"] = None
            return
        self._keep_reference(copy.deepcopy(self.model))

    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Other weights as the reference: a Transformer state dict of the policy's shape (as ``load_weights``)."""
        reference = Transformer(self.config)
        missing, unexpected = reference.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "output.weight" and self.config.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(
                f"reference weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self._keep_reference(reference)

    def _keep_reference(self, reference: Transformer) -> None:
        reference.requires_grad_(False).eval()  # eval for good: Module.train() does not reach a non-submodule
        device = next(self.model.parameters()).device
        self.__dict__["_reference"] = reference.to(device)
        self._reference_parallelized = False

    def configure_model(self) -> None:
        super().configure_model()
        reference = self.reference
        if reference is not None and self._trainer is not None and not self._reference_parallelized:
            parallelize.apply(reference, self.config, self.trainer.strategy)  # sharded / compiled as the policy
            self._reference_parallelized = True

    def _apply(self, fn, recurse=True):
        # .to(device), .half(), ...: every move of the module goes through _apply; the reference follows it
        super()._apply(fn, recurse)
        reference = self.__dict__.get("_reference")
        if reference is not None:
            reference._apply(fn, recurse)
        return self

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The reference's logits (N, T, V) of ``input_ids`` (N, T)."""
        if self.reference is not None:
            return self.reference(input_ids)
        if not lora.has_adapters(self.model):
            raise RuntimeError("PreferenceLM has no reference policy: call freeze_reference() after load_weights()")
        training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with lora.disabled(self.model):
                return self.model(input_ids)
        finally:
            self.model.train(training)

    # ---- steps

    def pair_stats(self, batch: dict[str, torch.Tensor]) -> PairStats:
        input_ids, labels = pair_batch(batch)  # (2B, T)
        logps, tokens = response_logps(self(input_ids), labels)  # (2B,)
        ref_logps, _ = response_logps(self.reference_logits(input_ids), labels)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        n_chosen, n_rejected = tokens.chunk(2)
        loss = preference_loss(
            chosen_ratio, rejected_ratio, self.beta, self.label_smoothing, self.loss_type, n_chosen, n_rejected
        )
        return PairStats(
            loss,
            self.beta * chosen_ratio.detach(),
            self.beta * rejected_ratio.detach(),
            chosen.detach(),
            rejected.detach(),
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        stats = self.pair_stats(batch)
        loss = stats.loss.mean()
        self.log("train/loss", loss)  # read by the logger and the progress bar on their steps: no per-step sync
        self.log_dict({f"train/{name}": value.mean() for name, value in stats.per_pair().items()})
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        stats = self.pair_stats(batch)
        self.val_loss.update(stats.loss.detach())  # a vector: MeanMetric averages its elements, per pair
        for name, value in stats.per_pair().items():
            self.val_pair_metrics[_key(name)].update(value)
        self.val_pairs.update(stats.loss.numel())

    def validation_metrics(self) -> dict[str, Any]:
        """The mean loss per pair, the mean of each of TRL's metrics per pair, and the pairs counted."""
        results = {"loss": float(self.val_loss.compute())}
        results.update({name: float(self.val_pair_metrics[_key(name)].compute()) for name in PAIR_METRICS})
        results["examples"] = int(self.val_pairs.compute())
        return results

    def on_validation_epoch_end(self) -> None:
        self.validation_results = results = self.validation_metrics()
        shown = ("loss", "rewards/accuracies")
        self.log_dict({f"val/{k}": results[k] for k in shown}, prog_bar=True, sync_dist=False)  # already reduced
        self.log_dict({f"val/{k}": results[k] for k in PAIR_METRICS if k not in shown}, sync_dist=False)
        for metric in (self.val_loss, self.val_pairs, *self.val_pair_metrics.values()):
            metric.reset()


def _key(name: str) -> str:
    return name.replace("/", "_")  # ModuleDict keys are attribute-like


def reference_state(path: str, policy: PreferenceLM) -> dict[str, torch.Tensor]:
    """The Transformer weights of the checkpoint at ``path``, which must be of the policy's shape."""
    ckpt = checkpoint.load(path)
    saved = checkpoint.model_config_of(ckpt, path)
    diff = checkpoint.shape_differences(saved.to_dict(), policy.config.to_dict())
    if diff:
        raise UserError(f"dpo.reference={path}: not a checkpoint of the evaluated model ({'; '.join(diff[:3])})")
    return checkpoint.model_state(ckpt, saved, path)
