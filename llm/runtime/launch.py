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
    """Make Lightning's subprocess launcher use ``hydra_subprocess_cmd`` (idempotent), and note an early SIGUSR1."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):  # the Trainer's launcher imports the function by name
        module._hydra_subprocess_cmd = hydra_subprocess_cmd
    note_early_signals()


_noted: list[str] = []  # signals that came before the training's own handlers (callbacks.resilience) were installed


def note_early_signals() -> None:
    """Until the trainer's handlers take over, a SIGUSR1 is noted instead of ending the process.

    SIGUSR1 is SLURM's pre-emption warning, sent to every task at a moment of SLURM's choosing; its default
    action ends the process, so one arriving while a task still reads its data or builds the model (or a
    requeued job resumes) would end the job unsaved and unrequeued. Noted, it stops the run at its first step,
    with a checkpoint (``LastCheckpoint`` takes it with ``take_noted_signal``). SIGTERM keeps its default: before training
    there is nothing to save, and a scheduler that sends it wants the job gone.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, note_signal)


def note_signal(signum: int, frame: object) -> None:
    """The early handler: remembers the signal for the training to act on."""
    import signal

    _noted.append(signal.Signals(signum).name)


def take_noted_signal() -> str | None:
    """The first signal noted by ``note_signal`` since the last call, if any (a sweep's next job starts clean)."""
    first = _noted[0] if _noted else None
    _noted.clear()
    return first


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


CHILD_EXIT_TIMEOUT_S = 300.0  # a finished job's processes exit within seconds; this bounds a hung one


@contextmanager
def job_scope() -> Iterator[None]:
    """Leave the process as the job found it: a sweep runs its DDP/FSDP jobs one after another in one process.

    Lightning's launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in the parent's environment and keeps the
    process group; the next job would then believe its processes were started externally and wait for peers
    that never come. It also never waits for the processes it started, and its child-process observer (a
    thread that SIGKILLs the whole process when one of *its* children exits non-zero) outlives the job: a
    child of job 0 still shutting down when job 1 starts, and ending with a non-zero code, killed the sweep in
    the middle of job 1. So at the end of a job its observers are disarmed and its children are reaped (a
    failed one fails this job, not the next), then the process group is destroyed (after the children: they
    never see their peer go away while they still run) and the environment is restored exactly.
    Only the launching parent is cleaned (a child's environment was given to it). A process that did not launch
    the job (Lightning's child, or one started by torchrun/SLURM) destroys its process group when its job
    succeeds: left to the interpreter's exit, Gloo's worker threads are torn down with the interpreter and now
    and then abort the process (SIGABRT, "terminate called without an active exception") after a good run. On
    failure it is left alone, since a peer may still be inside a collective with it (torchtitan does the same).
    """
    before = dict(os.environ)
    launched_here = "LOCAL_RANK" not in before
    observers_before = set(_child_observers())
    failed = True
    try:
        yield
        failed = False
    finally:
        if launched_here:
            try:
                observers = [t for t in _child_observers() if t not in observers_before]
                children = [proc for t in observers for proc in _disarm(t)]
                if failed:  # rank 0 gave up: the others may wait in a collective for it, end them
                    _destroy_process_group()
                    codes = _reap(children, timeout=0.0)
                else:
                    codes = _reap(children, timeout=CHILD_EXIT_TIMEOUT_S)
                    _destroy_process_group()
            finally:
                _restore_environ(before)
            bad = {proc.pid: code for proc, code in zip(children, codes) if code != 0}
            if bad and not failed:
                raise RuntimeError(f"a process of this job ended badly (pid: exit code): {bad}")
        elif not failed:
            _destroy_process_group()


def _child_observers() -> list:
    """The running observer threads of Lightning's subprocess launchers (one per launch)."""
    import threading

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    return [t for t in threading.enumerate() if isinstance(t, _ChildProcessObserver)]


def _disarm(observer) -> list:
    """Stop ``observer`` from acting on its children (it would SIGKILL this process if one exits non-zero, even
    during a later job); returns those children. Its next wake-up finds no children and ends the thread; a
    check already under way sends signal 0, which kills nothing."""
    children = list(observer._child_processes)
    observer._termination_signal = 0
    observer._child_processes = []
    observer._finished = True
    return children


def _reap(children: list, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``children`` to exit, then SIGTERM, then SIGKILL; their exit codes."""
    import subprocess

    deadline = time.monotonic() + timeout
    for sig in (None, "terminate", "kill"):
        for proc in children:
            if proc.poll() is None and sig is not None:
                getattr(proc, sig)()
        for proc in children:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0) if sig is None else 10.0)
            except subprocess.TimeoutExpired:
                pass
        if all(proc.returncode is not None for proc in children):
            break
    return [proc.returncode for proc in children]


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _restore_environ(before: dict[str, str]) -> None:
    """Undo every change the job made to the environment: added, changed and removed variables."""
    for key in set(os.environ) - set(before):
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


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
