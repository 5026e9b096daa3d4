"""Where a run executes: the accelerator, how many processes, and how they split into data-parallel replicas.

Two views of one thing. Before any process exists, ``Topology.from_trainer`` reads the trainer config
(``accelerator``, ``devices``, ``num_nodes``, ``strategy``) as Lightning will interpret it; the planner and the
gradient-accumulation rule need it then. Inside a running Trainer, ``data_parallel_rank`` asks the live
strategy, which knows what the launcher actually started.

A data-parallel replica reads its own batches; the ranks of one tensor-parallel group share a batch, so the
replicas are the processes divided by the tensor-parallel size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from llm.errors import UserError

GPU_NAMES = ("gpu", "cuda")


def accelerator_of(name: str | None) -> str:
    """``"cuda"`` or ``"cpu"``: what ``trainer.accelerator`` (``auto``, ``gpu``, ``cuda``, ``cpu``) runs on here."""
    name = str(name or "auto").lower()
    if name in GPU_NAMES or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _count_devices(devices: Any, accelerator: str) -> int:
    """Devices per node from Lightning's spellings: a number, ``auto``/-1 (all GPUs), ``"0,1,3"`` or a list."""
    if devices in ("auto", -1, "-1", None):
        return max(1, torch.cuda.device_count()) if accelerator == "cuda" else 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if not isinstance(devices, (int, str)):  # a list of device indices
        return len(list(devices))
    try:
        n = int(devices)
    except ValueError as err:
        raise UserError(f"trainer.devices={devices!r} is not a number of devices") from err
    if n < 1:
        raise UserError(f"trainer.devices={devices!r} must be >= 1 (or auto)")
    return n


def _strategy(strategy: Any) -> tuple[str, int, bool]:
    """(name, tensor-parallel size, activation checkpointing) of ``trainer.strategy``: a name or a ``_target_`` node."""
    if isinstance(strategy, Mapping):
        name = str(strategy.get("_target_", ""))
        tp = int(strategy.get("tensor_parallel_size", 1) or 1)
        checkpointing = bool(
            strategy.get("activation_checkpointing") or strategy.get("activation_checkpointing_policy")
        )
        return name, tp, checkpointing
    return str(strategy or "auto"), 1, False


@dataclass(frozen=True)
class Topology:
    """The processes of a run as the trainer config describes them."""

    accelerator: str = "cpu"  # "cuda" or "cpu"
    devices: int = 1  # processes per node
    num_nodes: int = 1
    tensor_parallel: int = 1  # processes that share one batch (a tensor-parallel group)
    sharded: bool = False  # FSDP: weights, gradients and optimizer state divided over the processes
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.world_size % self.tensor_parallel:
            raise UserError(
                f"trainer.strategy.tensor_parallel_size={self.tensor_parallel} does not divide the"
                f" {self.world_size} processes (trainer.devices x trainer.num_nodes)"
            )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def data_parallel_size(self) -> int:
        """Replicas that each read their own batches."""
        return self.world_size // self.tensor_parallel

    @classmethod
    def from_trainer(cls, trainer: Mapping[str, Any]) -> Topology:
        accelerator = accelerator_of(trainer.get("accelerator"))
        name, tp, checkpointing = _strategy(trainer.get("strategy"))
        flat = name.lower().replace("_", "")
        num_nodes = int(trainer.get("num_nodes", 1) or 1)
        if num_nodes < 1:
            raise UserError(f"trainer.num_nodes={num_nodes} must be >= 1")
        topology = cls(
            accelerator=accelerator,
            devices=_count_devices(trainer.get("devices", 1), accelerator),
            num_nodes=num_nodes,
            tensor_parallel=max(1, tp),
            sharded="fsdp" in flat or "modelparallel" in flat,
            activation_checkpointing=checkpointing,
        )
        check_slurm_tasks(topology)
        return topology


def check_slurm_tasks(topology: Topology, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, before anything is read or built, a SLURM job whose tasks are not the processes the trainer expects.

    Lightning takes SLURM's tasks as its processes (one per device): with ``--ntasks-per-node`` other than
    ``trainer.devices`` (or ``--nodes`` other than ``trainer.num_nodes``) it fails after the data is read, in a
    traceback; with ``python train.py`` run in the batch script itself, not under ``srun``, rank 0 waits for
    ranks that never start. Jobs named ``bash``/``interactive`` are Lightning's opt-out of SLURM (processes
    started by hand inside an allocation) and are not checked.
    """
    import os

    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    ntasks = int(env["SLURM_NTASKS"])
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        raise UserError(
            f"this SLURM job has {ntasks} tasks but train.py runs in the batch script itself: start it with"
            " `srun python train.py ...` (scripts/train.sbatch does)"
        )
    per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_STEP_TASKS_PER_NODE"))
    if per_node is not None and per_node.isdigit() and int(per_node) != topology.devices:
        raise UserError(
            f"SLURM starts {per_node} tasks per node (--ntasks-per-node={per_node}) but trainer.devices="
            f"{topology.devices}: they must be equal (one task per device)"
        )
    nodes = env.get("SLURM_NNODES")
    if nodes is not None and nodes.isdigit() and int(nodes) != topology.num_nodes:
        raise UserError(
            f"SLURM runs this job on {nodes} nodes (--nodes={nodes}) but trainer.num_nodes={topology.num_nodes}:"
            " they must be equal"
        )


def data_parallel_rank(trainer: Any) -> tuple[int, int]:
    """(rank, replicas) of data parallelism inside a running ``trainer``.

    Lightning's strategies say so in ``distributed_sampler_kwargs`` (a tensor-parallel group shares one rank);
    single-device strategies have none, and then each process is its own replica.
    """
    kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    if kwargs:
        return kwargs["rank"], kwargs["num_replicas"]
    return trainer.global_rank, trainer.world_size


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process from the default process group, or (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_first_process() -> bool:
    """Whether this is rank 0 of the run, from the launchers' environment (usable before a process group exists)."""
    import os

    # torchrun and Lightning's launcher set RANK/LOCAL_RANK; srun sets only SLURM_PROCID (the global rank)
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0")))
    return rank == "0" and os.environ.get("NODE_RANK", "0") == "0"
