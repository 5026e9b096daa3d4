"""Where the per-file steps of a build run (``data.engine``): ``local``, worker processes on this machine (or this
process), or ``ray``, Ray tasks on a local Ray started here or on the cluster that ``RAY_ADDRESS`` names.

The steps (:func:`datamodules.filecache.prepare_file`, :func:`~datamodules.filecache.encode_entry`) are top-level
functions of plain arguments that write one file's entry under ``data.cache_dir`` (a temporary name, then a rename)
and return a count. Wherever they run, the entries are the same bytes, and so are the shards and the report that the
driver makes from them: the corpus-wide steps (exact dedup by hash partition, near_dedup, the split, tokenizer
training, copying ids into the shards) run in the calling process, over the entries (:mod:`datamodules.merge`).
The engine changes the speed only; it is not part of any cache key.

With ``ray``, every file is a task (one CPU each) whatever the corpus size, at most :data:`RAY_IN_FLIGHT_PER_CPU`
per CPU of the cluster submitted at a time; the report's ``clean_processes`` / ``encode_processes`` are then the
cluster's CPUs (at most one per task). A Ray started here (``num_cpus``: this machine's cores) lives for one build,
shared by its cleaning and encoding and by a mixture's sources (:func:`scope`), and is shut down after it; a Ray
already initialised by the caller, or a cluster, is used and left running. Tasks run in the caller's working
directory when the node has it, so relative paths read as they do here. On a cluster, the inputs and
``data.cache_dir`` must be on a file system every node mounts at the same path, and the package installed on every
node. Ray is an optional extra (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from datamodules.encoding import available_cpus
from datamodules.sources import DataError
from llm.errors import LLMError

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}  # one thread per worker: the workers are the parallelism
RAY_IN_FLIGHT_PER_CPU = 4  # tasks submitted ahead of the results: the cluster stays busy, the driver's state bounded
_NO_RAY = '{key}=ray needs Ray: pip install -e ".[ray]"'


def check(engine: str, key: str = "data.engine") -> str:
    """``engine`` if it is one of :data:`ENGINES` (and Ray is installed for ``ray``), else a one-line error."""
    if engine not in ENGINES:
        raise DataError(f"{key}={engine!r} is not an engine: expected one of {', '.join(ENGINES)}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise DataError(_NO_RAY.format(key=key))
    return engine


def run_tasks(
    fn: Callable[..., Any],
    tasks: Sequence[tuple],
    n_proc: int,
    done: Callable[[int, Any], None],
    engine: str = "local",
) -> int:
    """``fn(*task)`` for every task; ``done(i, result)`` is called as each finishes (in any order under Ray).
    ``local``: in ``n_proc`` worker processes, or in this one; ``ray``: as Ray tasks (``n_proc`` unused). Returns
    the processes used (Ray: the cluster's CPUs, at most one per task)."""
    if engine == "ray" and tasks:
        return _ray_tasks(fn, tasks, done)
    return _local_tasks(fn, tasks, n_proc, done)


# ---------------------------------------------------------------------------------------------------------
# local: this machine's processes


def _init_worker() -> None:
    os.environ.update(WORKER_ENV)


def _local_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], n_proc: int, done: Callable[[int, Any], None]) -> int:
    """In ``n_proc`` spawned worker processes, or in this process; 1 if the workers broke (a script without the
    ``if __name__ == "__main__":`` guard that spawn needs, a worker killed for memory) and this process did the rest."""
    left = list(range(len(tasks)))
    if n_proc > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("spawn")  # not fork: the tokenizer's Rust threads may hold locks
        try:
            with ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker) as pool:
                futures = {i: pool.submit(fn, *tasks[i]) for i in left}
                for i in list(left):
                    done(i, futures[i].result())
                    left.remove(i)
            return n_proc
        except (BrokenProcessPool, BrokenPipeError) as e:
            logger.warning(
                "data: worker processes failed (%s); preparing the files in this process instead. A script that "
                'prepares data with data.num_proc > 1 needs the `if __name__ == "__main__":` guard.',
                type(e).__name__,
            )
    for i in left:
        done(i, fn(*tasks[i]))
    return 1


# ---------------------------------------------------------------------------------------------------------
# ray: tasks on a local Ray or a cluster

_depth = [0]  # scopes entered
_started = [False]  # whether a Ray running now was started by us (and so is ours to shut down)
_handlers: dict[int, Any] = {}  # the signal handlers before our ray.init, put back at its shutdown


@contextlib.contextmanager
def signals_kept() -> Iterator[None]:
    """Around ``ray.init``: it installs its own SIGTERM handler (which exits the process) and leaves it after
    ``ray.shutdown``; a training run's handler chains to the one it found, so a later SIGTERM would then end the
    run instead of saving a checkpoint. The handlers found are put back once Ray is shut down."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        _handlers.update(before)


def _restore_signals() -> None:
    for s, handler in _handlers.items():
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(s, handler)
    _handlers.clear()


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """One build: a Ray that :func:`run_tasks` starts inside is shut down when the outermost scope ends (one start,
    ~3 s, for all the build's steps; training does not keep it). Usable as a decorator."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0 and _started[0]:
            _started[0] = False
            import ray

            ray.shutdown()
            _restore_signals()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DataError(_NO_RAY.format(key="data.engine")) from None
    if not ray.is_initialized():
        with signals_kept():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(include_dashboard=False)  # the cluster there (ray.init reads RAY_ADDRESS)
            else:  # "local": a new Ray, not one that `ray start` left running on this machine
                ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False)
        _started[0] = True
    return ray


def _in_cwd(cwd: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the driver's working directory when this node has it (relative paths read as there)."""
    if os.getcwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    return fn(*args)


def _ray_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], done: Callable[[int, Any], None]) -> int:
    with scope():
        ray = _ray()
        remote = ray.remote(_in_cwd).options(runtime_env={"env_vars": WORKER_ENV})
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        cwd = os.getcwd()
        pending: dict[Any, int] = {}  # ObjectRef -> task index
        submitted = 0
        try:
            while submitted < len(tasks) or pending:
                while submitted < len(tasks) and len(pending) < cpus * RAY_IN_FLIGHT_PER_CPU:
                    pending[remote.remote(cwd, fn, *tasks[submitted])] = submitted
                    submitted += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    done(pending.pop(ref), _result(ray, ref))
        finally:  # a task failed, or Ctrl-C: the others stop (their temporary files are removed by the next build)
            for ref in pending:
                ray.cancel(ref)
        return min(cpus, len(tasks))


def _result(ray: Any, ref: Any) -> Any:
    """The task's result; an error raised on purpose (a bad input file) as itself, without Ray's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, LLMError):
            raise e.cause from None
        raise
