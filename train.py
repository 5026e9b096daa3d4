"""Train, finetune or evaluate a language model: `python train.py [group=option] [key=value ...]`.

Composes conf/config.yaml with Hydra, resolves it once (llm/app/spec.py), then: seed, memory check, data, model,
callbacks, loggers, Trainer, fit, and a final validation of the best checkpoint. Returns the validation loss (the
last training loss when validation is off), so Hydra sweepers can minimise it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from llm.app import evaluate, loggers, schema
from llm.app.builders import build, build_all, check_all
from llm.app.spec import RunSpec, memory_plan, resolve
from llm.core.memory import check
from llm.errors import LLMError
from llm.runtime import launch
from llm.training import safe_load
from llm.training.checkpoint import best_checkpoint, check_resume
from llm.training.checkpoint_io import checkpoint_io

schema.register()
launch.install()  # DDP/FSDP children run this job once, in this run directory (also in a sweep)


@dataclass
class Outcome:
    """How a job ended: the value a sweeper minimises, the status for status.json and what else it records."""

    value: float
    status: str = "ok"  # "ok", or "stopped" by a signal (resume with ckpt_path=last)
    fields: dict[str, Any] = field(default_factory=dict)


def train(cfg: DictConfig) -> float:
    """Runs the job ``cfg`` describes; returns its final val/loss (NaN when stopped by a signal)."""
    return run(cfg).value


@loggers.tracking_scope()  # this job's W&B run ends with it, and its trackers' variables (a sweep: one process)
def run(cfg: DictConfig) -> Outcome:
    safe_load.allow_unsafe(cfg.allow_unsafe_checkpoint)  # before anything reads init_from or ckpt_path
    spec = resolve(cfg)
    check_all(cfg.logger)  # a tracker's missing package or a misspelt key fails now, not after the data is read
    L.seed_everything(spec.seed, workers=True)
    if cfg.plan.check and spec.experiment.trains:  # refuse a run that cannot fit (python -m llm.plan: the table)
        check(memory_plan(spec))

    datamodule = spec.experiment.build_datamodule(spec)
    datamodule.prepare()  # before the model: its vocabulary follows the tokenizer
    datamodule.save_artifacts(spec.run_dir)
    module = spec.experiment.build_module(spec, datamodule)
    if not spec.experiment.trains:  # measure init_from on the data, write eval.json
        return Outcome(evaluate.run(spec, module, datamodule))

    trainer: L.Trainer = build(
        cfg.trainer,
        "trainer",
        **spec.trainer_arguments(),
        callbacks=build_all(cfg.callbacks, hparams={"planned_memory_gb": _planned_memory_gb(spec, module)}),
        logger=build_all(cfg.logger),
        plugins=[checkpoint_io(cfg.checkpoint.async_save)],  # atomic writes; async: in a background thread
    )
    check_resume(spec.ckpt_path, module.config, module.adapter, module.adapter_base)
    try:
        if spec.ckpt_path is None:  # a fresh run: validate the initial model first, so every curve starts at step 0
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=spec.ckpt_path, **safe_load.lightning_kwargs())
    except SIGTERMException:  # Lightning cuts a validation short on SIGTERM; LastCheckpoint saved what there was
        return Outcome(float("nan"), "stopped", {"val_loss": float("nan"), "signal": "SIGTERM", **_noted(trainer)})
    if stopped_by := next((cb.stopped_by for cb in trainer.callbacks if getattr(cb, "stopped_by", None)), None):
        # saved, and no final validation to wait for; the signal tells scripts/train.sbatch whether to requeue
        return Outcome(float("nan"), "stopped", {"val_loss": float("nan"), "signal": stopped_by, **_noted(trainer)})

    if trainer.limit_val_batches == 0:  # validation off: there is no val/loss, the last training loss stands in
        train_loss = float(trainer.callback_metrics["train/loss"])
        return Outcome(train_loss, fields={"validation": "off", "train_loss": train_loss, **_noted(trainer)})
    noted = _noted(trainer)  # before the final validation, which loads the best checkpoint's callback states
    final = trainer.validate(
        module, datamodule=datamodule, ckpt_path=best_checkpoint(trainer), **safe_load.lightning_kwargs()
    )[0]
    fields = {"val_loss": float(final["val/loss"]), **noted}
    if "val/bpb" in final:
        fields["val_bpb"] = float(final["val/bpb"])
    return Outcome(fields["val_loss"], fields=fields)


def _noted(trainer: L.Trainer) -> dict[str, Any]:
    """What callbacks record for status.json (SpikeGuard: the spikes skipped and the rollbacks, with the data
    positions they skipped)."""
    return {k: v for cb in trainer.callbacks if hasattr(cb, "status_fields") for k, v in cb.status_fields().items()}


def _planned_memory_gb(spec: RunSpec, module: Any) -> float | None:
    """The planner's peak per device (GiB, as perf/peak_memory_gb) with the tokenizer's vocabulary, for HParams."""
    try:
        total = float(memory_plan(spec, vocab_size=module.config.vocab_size).total)
    except LLMError as err:  # an estimate to look at, never a reason to stop a run (plan.check decides that)
        rank_zero_warn(f"no planned memory for the HParams tab ({err})")
        return None
    return total / 2**30 if math.isfinite(total) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job. A user's mistake ends it with one line (exit 2); in a `-m` sweep any failing job is recorded
    in its `status.json` and the sweep goes on to the next job."""
    start = time.time()
    try:
        with launch.job_scope():
            outcome = run(cfg)
    except Exception as err:  # noqa: BLE001 - classified just below
        deliberate = isinstance(err, LLMError)  # raised on purpose, the message says what to fix; else a bug
        launch.write_status(
            cfg.run_dir,
            "failed",
            error=str(err) if deliberate else f"{type(err).__name__}: {err}",
            wall_s=_since(start),
        )
        if launch.in_sweep():
            print(
                f"error: {err if deliberate else repr(err)} (job recorded as failed; the sweep continues)",
                file=sys.stderr,
            )
            return math.inf  # worst for any sweeper that minimises; Optuna's sweeper refuses NaN
        if not deliberate:
            raise  # a bug, not a user's mistake: keep the traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    launch.write_status(cfg.run_dir, outcome.status, **outcome.fields, wall_s=_since(start))
    return outcome.value


def _since(start: float) -> float:
    return time.time() - start


if __name__ == "__main__":
    main()
