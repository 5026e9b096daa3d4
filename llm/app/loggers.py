"""Experiment trackers besides TensorBoard (conf/logger: wandb, mlflow): the packages they need, the keys they take,
which process opens an MLflow store (``built_here``), and the end of a job's tracking.

Each entry of the logger group is one of Lightning's own loggers; what Lightning leaves to us is below.

- Their packages are an extra (``pip install -e ".[tracking]"``). Lightning raises ModuleNotFoundError with a
  traceback only when the logger is built, after the data is prepared; ``check_installed`` names the missing package
  on one line, and train.py runs it (llm/app/builders.py ``check_all``) before anything else.
- ``WandbLogger`` and ``TensorBoardLogger`` take ``**kwargs`` and hand them on (to ``wandb.init``, to torch's
  ``SummaryWriter``) only when the logger starts, at the first metric: ``forwarded_to`` tells the key check
  (llm/app/builders.py) which signature those keys must fit, so a misspelt key fails before the data is prepared,
  not with a traceback at step 0.
- Lightning never ends the W&B run it started (``WandbLogger.finalize`` leaves it open, as a Trainer may be called
  again), and the trackers set variables for the whole process. ``tracking_scope`` ends the run with the job and
  puts the variables back: a sweep runs its jobs one after another in one process, and the next job would otherwise
  log into the previous job's W&B run and MLflow store.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

from llm.errors import UserError

EXTRA = "tracking"  # pyproject's optional dependencies that install every package below
# Lightning's logger class -> the modules it imports
NEEDS = {"WandbLogger": ("wandb",), "MLFlowLogger": ("mlflow",)}
SQL_NEEDS = ("sqlalchemy", "alembic")  # MLflow's database stores (sqlite:///...), which mlflow-skinny leaves out


def check_installed(name: str, node: DictConfig) -> None:
    """A logger entry whose package is missing fails here, on one line naming the entry and the install command."""
    target = str(node.get("_target_", "")).rpartition(".")[2]
    modules = NEEDS.get(target, ())
    if target == "MLFlowLogger" and _is_database(str(node.get("tracking_uri") or "")):
        modules += SQL_NEEDS
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UserError(f'logger={name} needs the {module} package: pip install -e ".[{EXTRA}]"')


def _is_database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


def built_here(node: DictConfig) -> bool:
    """Whether this process builds the logger entry: all do, except for an MLflow database store, which rank 0 alone
    opens. ``MLFlowLogger`` opens its store when built, on every rank, and two processes creating one SQLite store at
    once collide (seen here: one of two fails in SQLAlchemy); only rank 0 logs anyway. The rank is Lightning's, read
    from the launchers' environment (RANK, LOCAL_RANK, SLURM_PROCID) before the Trainer exists."""
    from lightning.pytorch.utilities import rank_zero_only

    target = str(node.get("_target_", "")).rpartition(".")[2]
    if target != "MLFlowLogger" or not _is_database(str(node.get("tracking_uri") or "")):
        return True
    return getattr(rank_zero_only, "rank", 0) == 0


def forwarded_to(obj: Any) -> Callable | None:
    """What receives a logger's ``**kwargs`` when the logger starts: ``wandb.init`` for Lightning's WandbLogger,
    torch's ``SummaryWriter`` for its TensorBoardLogger; None for any other target (or when wandb is missing)."""
    name = getattr(obj, "__name__", "")
    if name == "TensorBoardLogger":
        from torch.utils.tensorboard import SummaryWriter  # Lightning's choice when tensorboard is installed

        return SummaryWriter
    if name != "WandbLogger" or importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    return wandb.init


def var_keyword(signature: inspect.Signature) -> str | None:
    """The name of a signature's ``**kwargs`` parameter, if it has one."""
    return next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)


# set for the whole process by the trackers: WandbLogger(offline=True) sets WANDB_MODE, mlflow.set_tracking_uri (the
# MLFlowLogger's first metric) sets MLFLOW_TRACKING_URI, which the next job's conf/logger/mlflow.yaml would then read
PROCESS_ENV = ("WANDB_MODE", "MLFLOW_TRACKING_URI")


@contextmanager
def tracking_scope() -> Iterator[None]:
    """One job's trackers: the W&B run the job started, if any, ends with it (failed: exit code 1, so W&B marks it
    failed), and the variables in ``PROCESS_ENV`` are put back as the job found them.

    Used as a decorator of train.run, so a sweep's jobs, or runs started one after another from Python, each get
    their own W&B run and MLflow store. wandb is looked up in ``sys.modules``: a job without it never imports it.
    """
    before = {name: os.environ.get(name) for name in PROCESS_ENV}
    try:
        yield
    except BaseException:
        _finish_wandb(exit_code=1)
        raise
    else:
        _finish_wandb(exit_code=0)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=exit_code)
