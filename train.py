"""Train, finetune or evaluate a language model: `python train.py [group=option] [key=value ...]`.

Composes conf/config.yaml with Hydra, then: seed, data, model, callbacks, loggers, Trainer, fit, and a
final validation of the best checkpoint. Returns the validation loss, so Hydra sweepers can minimise it.
"""

from __future__ import annotations

import math
import sys
import time

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.resilience import TrainingDiverged
from datamodules.sources import DataError
from llm import plan
from llm.app import evaluate, schema
from llm.app import experiments as tasks
from llm.app.builders import (
    best_checkpoint,
    build,
    build_all,
    check_resume,
    resolve_accumulation,
    resolve_ckpt_path,
    resolve_precision,
)
from llm.errors import UserError
from llm.runtime import launch

schema.register()
launch.install()  # DDP/FSDP children run this job once, in this run directory (also in a sweep)


def train(cfg: DictConfig) -> float:
    L.seed_everything(cfg.seed, workers=True)
    resolve_precision(cfg)  # before the planner, so that it and the Trainer see the same precision
    resolve_accumulation(cfg)
    init = tasks.load_init(cfg)  # init_from: weights, model shape (set into cfg.model) and tokenizer; or None
    if cfg.plan.check and cfg.task != "eval":  # refuse a run that cannot fit (python -m llm.plan shows the table)
        plan.check(plan.plan_from_config(cfg))

    datamodule = tasks.build_datamodule(cfg, init)
    datamodule.prepare()  # before the model: its vocabulary follows the tokenizer
    datamodule.save_artifacts(cfg.run_dir)

    module = tasks.build_module(cfg, datamodule, init)
    if cfg.task == "eval":  # no training: measure init_from on the data, write eval.json
        return evaluate.run(cfg, module, datamodule)

    trainer: L.Trainer = build(
        cfg.trainer,
        "trainer",
        callbacks=build_all(cfg.callbacks),
        logger=build_all(cfg.logger),
        plugins=[AtomicCheckpointIO()],
    )
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.run_dir)
    check_resume(ckpt_path, module)
    try:
        if ckpt_path is None:  # a fresh run: validate the initial model first, so every curve starts at step 0
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning cuts a validation short on SIGTERM; LastCheckpoint saved what there was
        return float("nan")
    if any(getattr(cb, "stopped_by", None) for cb in trainer.callbacks):
        return float("nan")  # stopped by a signal: saved, and no final validation to wait for

    results = trainer.validate(module, datamodule=datamodule, ckpt_path=best_checkpoint(trainer))
    return float(results[0]["val/loss"])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job. A user's mistake ends it with one line (exit 2); in a `-m` sweep any failing job is recorded
    in its `status.json` and the sweep goes on to the next job."""
    start = time.time()
    try:
        with launch.job_scope():
            val_loss = train(cfg)
    except Exception as err:  # noqa: BLE001 - classified just below
        message = user_error_message(err)
        launch.write_status(
            cfg.run_dir, "failed", error=message or f"{type(err).__name__}: {err}", wall_s=time.time() - start
        )
        if launch.in_sweep():
            print(f"error: {message or repr(err)} (job recorded as failed; the sweep continues)", file=sys.stderr)
            return math.inf  # worst for any sweeper that minimises; Optuna's sweeper refuses NaN
        if message is None:
            raise  # a bug, not a user's mistake: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    status = "stopped" if math.isnan(val_loss) else "ok"  # stopped by a signal: resume with ckpt_path=last
    launch.write_status(cfg.run_dir, status, val_loss=val_loss, wall_s=time.time() - start)
    return val_loss


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user's mistake (a wrong value, a bad file, a diverged run), else None."""
    if isinstance(err, (UserError, DataError, TrainingDiverged)):
        return str(err)
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, (ValueError, TypeError)):
        return str(err.__cause__)  # a constructor refused a configured value
    return None


if __name__ == "__main__":
    main()
