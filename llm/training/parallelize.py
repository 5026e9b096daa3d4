"""Parallelism, applied to the Transformer from the outside (the model file knows nothing of it).

``trainer=fsdp`` uses ``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) with
the data-parallel size defaulting to the world size divided by the tensor-parallel size (Lightning's own
"auto" gives tensor parallel over all devices and no sharding), checkpoints written atomically, and the
model prepared by ``apply``: optional tensor parallelism, activation checkpointing and ``torch.compile`` per
block, then ``fully_shard`` per block and on the root, with a bf16-compute / fp32-reduce policy on GPU.
Under FSDP the module builds the model on the meta device; Lightning materialises it shard by shard
(``reset_parameters`` on each module), so no rank ever holds the full model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from llm.core.config import ModelConfig
from llm.errors import UserError
from llm.training import safe_load


def apply(model: nn.Module, cfg: ModelConfig, strategy: Any | None) -> nn.Module:
    """Prepare ``model`` for ``strategy`` in place: TP, activation checkpointing, compile, FSDP."""
    fsdp = strategy if isinstance(strategy, FSDP2Strategy) else None
    if fsdp is not None and fsdp.tensor_parallel_size > 1:
        apply_tensor_parallel(model, fsdp.device_mesh["tensor_parallel"])
    if fsdp is not None and fsdp.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for block in model.layers:
            block.compile()  # in place (names unchanged), per block: small graphs, compiled once, reused n_layers times
    if fsdp is not None:
        apply_fsdp(model, fsdp.device_mesh["data_parallel"], fsdp.mp_policy(), fsdp.reshard_after_forward)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            # Materialise the shards here rather than let Lightning do it: Lightning calls `to_empty` on the whole
            # LightningModule, which also empties the torchmetrics states (val/loss became garbage).
            model.to_empty(device=fsdp.root_device)
            model.init_weights()  # reset_parameters of every module, on the local shards; re-ties the head
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward: keeps only block inputs (see llm/plan.py)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        # the wrapper strips its own prefix from state_dict keys, so checkpoints keep the plain names
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp(model: nn.Module, mesh: Any, mp_policy: Any | None, reshard_after_forward: bool) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head: the tied weight lives there)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together: a plain float32 scalar, the same on every rank.

    Under tensor parallelism the DTensors live on two meshes (the blocks' matrices on the 2-D mesh, the norms'
    gains on the data-parallel one), and torch's ``clip_grad_norm_`` cannot stack norms from different meshes.
    Here the norms are stacked per mesh and each mesh's total made whole with one collective.
    """
    from torch.distributed.tensor import DTensor

    per_mesh: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        per_mesh.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(
            torch.linalg.vector_norm(t, dtype=torch.float32)
        )
    totals = []
    for mesh, norms in per_mesh.items():
        total = torch.linalg.vector_norm(torch.stack(norms))
        totals.append(total.full_tensor() if mesh is not None else total)
    if not totals:
        return torch.zeros(())
    device = totals[0].device
    return torch.linalg.vector_norm(torch.stack([t.to(device) for t in totals]))


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that may be DTensors on different meshes (see
    ``total_norm``); scales the gradients in place, returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local:
        torch._foreach_mul_(local, coef.to(local[0].device))
    return norm


def apply_tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """Megatron-style plan per block: q/k/v and w1/w3 split by columns (heads, hidden units), wo and w2 by rows.

    Each rank then holds n_heads / tp query heads and n_kv_heads / tp key/value heads, so both must divide.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    cfg = model.cfg
    if cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise UserError(
            f"tensor_parallel_size={tp} must divide model.n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}"
        )
    if cfg.qk_norm:  # each rank would see its own heads only, and its gains would drift from the others'
        raise UserError(f"model.qk_norm=true does not work with tensor_parallel_size={tp} yet: use FSDP or DDP alone")
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # the attention module reshapes with its head counts: each rank sees its share of heads
        block.attention.n_heads = cfg.n_heads // tp
        block.attention.n_kv_heads = cfg.n_kv_heads // tp


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 through Lightning, with the defaults a Llama run wants (see the module docstring).

    Args:
        tensor_parallel_size: devices per tensor-parallel group (1: pure FSDP).
        data_parallel_size: "auto" = world size / tensor_parallel_size.
        activation_checkpointing: recompute each block in backward.
        mixed_precision: "auto" (bf16 compute, fp32 gradient reduction on GPU; none on CPU), "bf16" or "none".
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); False keeps them (ZeRO-2).
        save_distributed_checkpoint: sharded checkpoints (a directory, each rank writes its shards).
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        data_parallel_size: int | str = "auto",
        activation_checkpointing: bool = False,
        mixed_precision: str = "auto",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        if mixed_precision not in ("auto", "bf16", "none"):
            raise UserError(f"trainer.strategy.mixed_precision must be auto, bf16 or none, got {mixed_precision!r}")
        self.tensor_parallel_size = tensor_parallel_size
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self._async_saves = 0
        self._async_groups: list[Any] = []

    def setup_environment(self) -> None:
        world = self.num_processes * self.num_nodes
        if world % self.tensor_parallel_size:
            raise UserError(f"tensor_parallel_size={self.tensor_parallel_size} does not divide the world size {world}")
        if self._data_parallel_size == "auto":  # Lightning's "auto" is num_nodes: no sharding inside a node
            self._data_parallel_size = world // self.tensor_parallel_size
        super().setup_environment()

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """Build the model on the meta device unless told otherwise: no rank allocates the full model; Lightning
        then materialises each shard (``to_empty`` + ``reset_parameters``) after ``fully_shard``."""
        with super().tensor_init_context(empty_init=True if empty_init is None else empty_init):
            yield

    def mp_policy(self) -> Any | None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        on_gpu = self.root_device.type == "cuda"
        if self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and on_gpu):
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write into ``<path>.tmp`` (every rank its shards), then swap it in place on rank 0.

        A crash during the write leaves the previous checkpoint whole; the swap is two renames (``swap_in``).
        """
        from llm.training.checkpoint import swap_in
        from llm.training.checkpoint_io import AsyncCheckpointIO

        path = Path(self.broadcast(str(filepath)))
        if self._save_distributed_checkpoint and isinstance(self.checkpoint_io, AsyncCheckpointIO):
            self._async_saves += 1  # checkpoint.async_save: a name of its own per save, as several may be in flight
            tmp = Path(self.broadcast(str(path.with_name(f"{path.name}.tmp-{os.getpid()}-{self._async_saves}"))))
            group = self._checkpoint_groups()[self._async_saves % 2]
            self.checkpoint_io.save_sharded(checkpoint, path, tmp, self.global_rank, group)
            return
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            swap_in(tmp, path)
        self.barrier()

    def _checkpoint_groups(self) -> list[Any]:
        """Two gloo groups for asynchronous saves, made at the first (collective: every rank saves together).

        Two saves may be in flight (AsyncCheckpointIO.max_pending), each in a DCP thread of its own; on one
        group their collectives would interleave and hang, so consecutive saves alternate between two."""
        if not self._async_groups:
            self._async_groups = [torch.distributed.new_group(backend="gloo") for _ in range(2)]
        return self._async_groups

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, except for an adapter run's sharded checkpoint, which holds the trainable tensors only:
        Lightning asks the checkpoint for every tensor of the model (frozen base included) and fails."""
        from llm.training import adapters
        from llm.training.checkpoint import is_sharded

        module = self.lightning_module
        wait = getattr(self.checkpoint_io, "wait", None)
        if wait is not None:  # checkpoint.async_save: what is read may still be in the writer thread
            wait()
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded(path):  # before DCP, which unpickles .metadata and non-tensor entries unrestricted
            safe_load.check_sharded(path)
        if not is_sharded(path) and path.is_file():  # saved by a single-device or DDP run
            return self._load_whole_file(path)
        if getattr(module, "adapter", None) is None or not is_sharded(path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        names = adapters.trainable_names(module)
        state = {"state_dict": {k: v for k, v in get_model_state_dict(self.model).items() if k in names}}
        load(state, checkpoint_id=path)  # into the local shards of those tensors
        self.model.load_state_dict(state["state_dict"], strict=False)
        for i, optimizer in enumerate(self.optimizers):  # named as Lightning saves them (optimizer_states_from_list)
            optim_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optim_state[f"optimizer_{i}"],
                options=StateDictOptions(cpu_offload=True),
            )  # fmt: skip
        return safe_load.torch_load(path / "meta.pt")

    def _load_whole_file(self, path: Path) -> dict[str, Any]:
        """A single-device or DDP checkpoint into this run's shards: the weights, and each optimizer's state.

        Lightning's own reading of such a file renumbers the optimizer state by the module's parameter order,
        but an optimizer numbers its parameters group after group (matrices, then the rest: optim.param_groups),
        so each moment went to another parameter (or failed on a shape). Here the numbers are matched to the names
        in this run's optimizer order, the order the saving run's optimizer had (the same configure_optimizers).
        """
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from llm.training.checkpoint import by_name

        ckpt = safe_load.torch_load(path, mmap=True)
        _load_raw_module_state(ckpt.pop("state_dict"), self.model, strict=self.lightning_module.strict_loading)
        saved = ckpt.get("optimizer_states") or []
        if saved and len(saved) != len(self.optimizers):
            raise UserError(f"{path}: holds {len(saved)} optimizer states, this run has {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, saved):
            groups = get_optimizer_state_dict(self.model, optimizer)["param_groups"]
            names = [name for group in groups for name in group["params"]]
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=by_name(state, names, path),
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
            )  # fmt: skip
        return ckpt

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
