"""TensorBoard's HParams tab: each run's settings next to its final metrics, so that a sweep sorts by val/loss.

At the end of training the callback writes the settings it was given (``params``, flattened to ``optim.lr``,
``model.dim``, ...) together with the final metrics under tags of their own, ``hp/val_loss``,
``hp/tokens_per_sec``, ... (see ``METRICS``): Lightning's ``log_hyperparams`` writes the metrics as scalars too,
which under ``val/loss`` would add a point to that curve. After the final validation of the best checkpoint
(train.py), the ``hp/val_*`` metrics are written again with its values, the value train.py returns and a sweeper
minimises; the tab shows the last value of each tag. A run that fails still shows its settings with the metrics it
reached. Other loggers (``logger=wandb``, ``logger=mlflow``) get the same settings as their run's config or
parameters (``log_hyperparams``) and the ``hp/*`` metrics as ordinary metrics.

The callback also logs ``perf/planned_memory_gb`` once, at the start of training: the memory planner's estimate of
the peak per device, which train.py computes from the resolved run (llm/app/spec.py) and passes in, in GiB like the
measured ``perf/peak_memory_gb`` of callbacks/throughput.py, so the two can be compared on one chart.

``params`` comes from the config by interpolation (conf/callbacks/default.yaml) and lists what the tab shows. The
values the run derives are replaced by those it actually used: ``model.*`` by the model as built (its vocabulary
follows the tokenizer), ``trainer.precision`` and ``trainer.accumulate_grad_batches`` by the Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from llm.errors import UserError

# HParams-tab tag -> the metric it reports (those a run logs; a classifier has val/f1, a language model val/ppl)
METRICS = {
    "hp/val_loss": "val/loss",
    "hp/val_bpb": "val/bpb",
    "hp/val_ppl": "val/ppl",
    "hp/val_acc": "val/acc",
    "hp/val_f1": "val/f1",
    "hp/train_loss": "train/loss",
    "hp/tokens_per_sec": "perf/tokens_per_sec",
    "hp/mfu": "perf/mfu",
    "hp/peak_memory_gb": "perf/peak_memory_gb",
}
PLANNED = "perf/planned_memory_gb"


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; Hydra's ``_target_``-like keys are dropped, and values other
    than numbers, strings and booleans become text (TensorBoard accepts no others): None -> "null", lists -> JSON."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        key = str(key)
        if key.startswith("_") and key.endswith("_"):
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif value is None:
            flat[prefix + key] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = json.dumps(value, default=str)
    return flat


class HParams(L.Callback):
    """Writes the run's settings and final metrics to TensorBoard's HParams tab (see the module docstring).

    Args:
        params: the settings to show, a nested dict (flattened with dots).
        planned_memory_gb: the planner's estimate of the peak per device (GiB); None: not logged.
        metrics: HParams tag -> metric logged by the run; default ``METRICS``.
    """

    def __init__(
        self,
        params: dict[str, Any] | None = None,
        planned_memory_gb: float | None = None,
        metrics: dict[str, str] | None = None,
    ) -> None:
        self.params = flatten(dict(params or {}))
        self.metrics = dict(METRICS if metrics is None else metrics)
        if any(source == tag for tag, source in self.metrics.items()):
            raise UserError("callbacks.hparams.metrics: an HParams tag must differ from the metric it reports")
        self.planned_memory_gb = planned_memory_gb
        self.written = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.planned_memory_gb is not None:
            for logger in trainer.loggers:
                logger.log_metrics({PLANNED: self.planned_memory_gb}, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)  # before the loggers close at the end of fit

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and not self.written:
            self._write(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the validation of the best checkpoint after fit: its val/* are the run's final result
        if self.written and trainer.state.fn == "validate":
            final = {tag: v for tag, v in self._values(trainer).items() if self.metrics[tag].startswith("val/")}
            for logger in trainer.loggers:
                logger.log_metrics(final, step=trainer.global_step)

    def hparams(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> dict[str, Any]:
        """The flat settings written to the tab, with the values the run used (model as built, Trainer's settings)."""
        params = dict(self.params)
        config = getattr(pl_module, "config", None)
        if dataclasses.is_dataclass(config):
            built = flatten(dataclasses.asdict(config), "model.")
            params.update({k: v for k, v in built.items() if k in params})
        if trainer is not None:
            used = {
                "trainer.precision": trainer.precision,
                "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            }
            params.update({k: v for k, v in used.items() if k in params})
        return params

    def _values(self, trainer: L.Trainer) -> dict[str, float]:
        values = {}
        for tag, source in self.metrics.items():
            value = trainer.callback_metrics.get(source)
            if value is not None:
                values[tag] = float(value)
        return values

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._values(trainer)
        if self.planned_memory_gb is not None:
            metrics["hp/planned_memory_gb"] = self.planned_memory_gb
        params = self.hparams(pl_module, trainer)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the HParams summary, and the metrics as scalars
                logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
            else:
                logger.log_hyperparams(params)
                logger.log_metrics(metrics, step=trainer.global_step)
        self.written = True
