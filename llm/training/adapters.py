"""Training with adapters (``adapter=lora`` / ``qlora``): the frozen base on the device, what a checkpoint keeps.

An adapter checkpoint is Lightning's, with the trainable tensors only (the adapters, a classifier's head) in
``state_dict`` and an ``adapter`` entry::

    {"config": LoRAConfig.to_dict(), "base": {"path": <init_from, absolute>, "sha256": <its content hash>},
     "tensors": [the names kept]}

so that it is a few MB for any base size. Reading it back (llm/training/checkpoint.py ``load``) finds the base
by its path, checks its hash, and puts base and adapters together; resuming checks the same hash against the
run's ``init_from``, so adapters never land on weights they were not trained on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm.core import lora
from llm.errors import UserError

# wrappers that insert a prefix into parameter names but not into state_dict keys
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _state_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(module: nn.Module) -> set[str]:
    """State-dict names of the parameters that train (``model.layers.0.attention.wq.lora_a``, ``head.weight``)."""
    return {_state_name(n) for n, p in module.named_parameters() if p.requires_grad}


def prepare_base(model: nn.Module, cfg: lora.LoRAConfig, strategy: Any, precision: str) -> None:
    """Store the frozen weights as the run computes with them: NF4 for QLoRA, bf16 under bf16 on one GPU or DDP.

    On CPU nothing changes (float32 matmuls are the fast ones there). Under FSDP2 the base stays float32: FSDP2
    requires one dtype per sharded group and its mixed-precision policy already gathers the weights in bf16.
    """
    from llm.training.parallelize import FSDP2Strategy

    device = strategy.root_device
    if cfg.quantize == "nf4":  # the targets' base in NF4; the other frozen weights follow the bf16 rule below
        from llm.training import quantize

        quantize.nf4(model, device)
    if device.type == "cuda" and str(precision).startswith("bf16") and not isinstance(strategy, FSDP2Strategy):
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():  # NF4 codes are uint8: left as they are
                p.data = p.data.to(torch.bfloat16)


def one_graph_per_block(model: nn.Module) -> None:
    """Make the frozen embedding's output require grad, so that every block's input does.

    Otherwise the first block's input alone needs no gradient, and ``torch.compile`` builds a second graph for it:
    on the CPU that tripled the first step (45 s -> 6 s for 3 debug blocks). Numerically nothing changes.
    """

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # not in validation / generation (inference tensors refuse it)
            out.requires_grad_(True)

    model.tok_embeddings.register_forward_hook(hook)


def keep_trainable(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen base from a checkpoint being saved; record the adapters' config and base."""
    keep = trainable_names(module)
    state = checkpoint.get("state_dict")
    if state is not None:
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
    checkpoint["adapter"] = {"config": module.adapter.to_dict(), "base": module.adapter_base, "tensors": sorted(keep)}


def check_resumable(module: nn.Module, checkpoint: dict[str, Any], where: str = "ckpt_path") -> None:
    """Refuse, in one line, a checkpoint these adapters cannot resume from (see ``check_checkpoint``)."""
    check_checkpoint(checkpoint, module.adapter, module.adapter_base, where)
    state = checkpoint.get("state_dict")
    if state is not None:  # a sharded checkpoint is read straight into the model; its meta lists the names
        missing = sorted(trainable_names(module) - set(state))
        if missing:
            raise UserError(f"{where}: the checkpoint lacks adapter tensors of this run ({', '.join(missing[:3])})")


def check_checkpoint(
    checkpoint: dict[str, Any], cfg: lora.LoRAConfig | None, base: dict[str, str] | None, where: str
) -> None:
    """The checkpoint to resume holds adapters of the same shape, trained on the same base, as this run's."""
    saved = checkpoint.get("adapter")
    if cfg is None:
        if saved is not None:
            raise UserError(f"{where}: the checkpoint holds LoRA adapters; resume it with the same adapter= group")
        return
    if saved is None:
        raise UserError(f"{where}: the checkpoint holds full weights, not adapters; resume it without adapter=")
    was = lora.LoRAConfig.from_dict(saved["config"])
    if (was.rank, was.targets, was.quantize) != (cfg.rank, cfg.targets, cfg.quantize):
        raise UserError(
            f"{where}: its adapters have rank {was.rank}, targets {list(was.targets)}, quantize {was.quantize};"
            f" this run asks rank {cfg.rank}, targets {list(cfg.targets)}, quantize {cfg.quantize}"
        )
    saved_base = saved.get("base") or {}
    if base is not None and saved_base.get("sha256") != base.get("sha256"):
        raise UserError(
            f"{where}: its adapters were trained on {saved_base.get('path')} (sha256 {str(saved_base.get('sha256'))[:12]}),"
            f" but init_from={base['path']} has sha256 {base['sha256'][:12]}: resume with the base they were trained on"
        )
