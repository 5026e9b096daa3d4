"""Hydra and multi-process launching: every process of a run works in the one run directory.

Lightning starts the extra processes of a DDP/FSDP run on one machine by re-running the command line
(``_SubprocessScriptLauncher``). Under Hydra it appends ``hydra.run.dir=<run.dir>``, which is wrong in two
ways for a sweep: ``sys.argv`` still holds ``-m`` and the swept values, so every child would start a sweep
of its own, and ``run.dir`` is not the job's directory. We replace the command with the job's own overrides
and its resolved output directory, so a child runs exactly the job of its parent, once, in the same place.

Processes started by others (torchrun, SLURM) resolve the run directory themselves; ``run_stamp`` gives them
a name they agree on without talking: the launcher's job id when there is one, else the clock.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from omegaconf import OmegaConf

from llm.runtime.topology import is_first_process


def hydra_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """Command and working directory of child ``local_rank``: the current Hydra job, in the current run dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)  # the job's overrides: a sweep's values already chosen, no -m
    command += [
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",  # the parent wrote .hydra/ already
    ]
    return command, get_original_cwd()


def install() -> None:
    """Make Lightning's subprocess launcher use ``hydra_subprocess_cmd`` (idempotent)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):  # the Trainer's launcher imports the function by name
        module._hydra_subprocess_cmd = hydra_subprocess_cmd


def run_stamp() -> str:
    """The run directory's name under outputs/: ``<date>/<time>``, or for processes started by torchrun or
    SLURM, which resolve it each on their own, ``torchrun-<run id>`` / ``slurm-<job id>`` (a requeued SLURM
    job keeps its id, so it finds its own last.ckpt again)."""
    for var, name in (("TORCHELASTIC_RUN_ID", "torchrun"), ("SLURM_JOB_ID", "slurm")):
        value = os.environ.get(var)
        if value and value != "none":
            return f"{name}-{value}"
    return time.strftime("%Y-%m-%d/%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


@contextmanager
def job_scope() -> Iterator[None]:
    """Leave the process as the job found it: a sweep runs its DDP/FSDP jobs one after another in one process.

    Lightning's launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in the parent's environment and keeps the
    process group; the next job would then believe its processes were started externally and wait for peers
    that never come. Only the launching parent is cleaned (a child's environment was given to it).
    """
    before = dict(os.environ)
    launched_here = "LOCAL_RANK" not in before
    try:
        yield
    finally:
        if launched_here:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for key in set(os.environ) - set(before):
                del os.environ[key]


def in_sweep() -> bool:
    """Whether this job is one of a Hydra multirun (`python train.py -m ...`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_status(run_dir: str, status: str, **fields: object) -> None:
    """`<run_dir>/status.json`: how the job ended (read by `python -m llm.runs`); written by the first process only."""
    import json
    from pathlib import Path

    if not is_first_process():
        return
    try:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "status.json").write_text(json.dumps({"status": status, **fields}, indent=1, default=str))
    except OSError:
        pass  # the run's outcome is already on the console; a read-only directory must not hide it
