"""Low-rank adapters (LoRA, Hu et al. 2021): W x + (alpha / r) * B (A dropout(x)), with W frozen.

``apply(model, cfg)`` swaps the chosen projections of every block (``cfg.targets`` among wq wk wv wo w1 w2 w3)
for ``LoRALinear``, which keeps the base ``weight`` under its name and adds ``lora_a`` (r, in) and ``lora_b``
(out, r). B starts at zero, so an adapted model computes exactly what the base does until it trains.

Why not PEFT: PEFT wraps each layer (``wq`` -> ``wq.base_layer`` + ``wq.lora_A.default``), which renames every
base weight in our checkpoints, FSDP shards and converter, and its layers initialise through
``reset_lora_parameters`` rather than ``reset_parameters``, the hook by which a meta-device model is
materialised. Here the base names stay, the adapter names are two tensors per layer, and the exporter writes
PEFT's own format (llm/convert_lora.py), so PEFT loads what we train.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.core.model import Linear

TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}  # fmt: skip
ADAPTER_KEYS = ("lora_a", "lora_b")  # the parameter names LoRALinear adds


@dataclass(frozen=True)
class LoRAConfig:
    """``adapter.*``: rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input, targets.

    ``quantize="nf4"`` (``adapter=qlora``) stores the frozen base weights of the targets in 4-bit NormalFloat
    (bitsandbytes, CUDA only; llm/training/quantize.py).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(TARGETS))
    quantize: str | None = None
    seed: int = 0  # draws the adapters' A matrices: the same on every rank, whatever else used the global RNG

    def __post_init__(self) -> None:
        from llm.errors import UserError

        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise UserError(f"adapter.rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise UserError(f"adapter.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"adapter.targets={list(self.targets)}: each must be one of {' '.join(TARGETS)}")
        if self.quantize not in (None, "nf4"):
            raise UserError(f"adapter.quantize={self.quantize!r} must be null or nf4")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> LoRAConfig:
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in dict(d).items()})


class LoRALinear(Linear):
    """A bias-free Linear plus a rank-r update; ``enabled=False`` computes the base layer alone.

    x (..., in) -> (..., out). The adapter runs in the input's dtype (autocast's under mixed precision).
    """

    def __init__(self, in_features: int, out_features: int, std: float, rank: int, alpha: float, dropout: float):
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = self.lora_b = None  # reset_parameters (called by nn.Linear.__init__) skips them until made
        super().__init__(in_features, out_features, std=std)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=self.weight.device))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=self.weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True
        self.reset_adapter()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.lora_a is not None:
            self.reset_adapter()

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        # A as nn.Linear's default (Kaiming-uniform, as in the LoRA paper's code and PEFT), B zero: no change at start
        if generator is None:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:  # drawn on the CPU generator, then copied: identical on any device and rank
            a = torch.empty(self.lora_a.shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                self.lora_a.copy_(a)
        nn.init.zeros_(self.lora_b)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)  # no-ops outside autocast-less 16-bit bases
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to the weight: scale * B A, (out, in), float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) of every adapted projection."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_adapters(model: nn.Module) -> bool:
    return any(True for _ in layers(model))


def apply(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Adapt ``cfg.targets`` of every block of a Transformer in place, and freeze everything else in it.

    The base weights are the same Parameters (moved into the new layers, not copied), on the same device; the
    adapters are created on that device (meta included: materialised by ``reset_parameters``), their A matrices
    drawn from ``cfg.seed`` in a fixed order.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    for block in model.layers:
        for target in cfg.targets:
            parent = getattr(block, TARGETS[target])
            old = getattr(parent, target)
            if isinstance(old, LoRALinear):
                continue
            device = old.weight.device
            with torch.device("meta"):  # no throwaway init of a full-size weight: the base one is moved in
                new = LoRALinear(old.in_features, old.out_features, old.std, cfg.rank, cfg.alpha, cfg.dropout)
            new.weight = old.weight
            new.lora_a = nn.Parameter(torch.empty(new.lora_a.shape, device=device))
            new.lora_b = nn.Parameter(torch.empty(new.lora_b.shape, device=device))
            if device.type != "meta":
                new.reset_adapter(generator)
            setattr(parent, target, new)
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2] in ADAPTER_KEYS)


def is_adapter_key(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_KEYS


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every adapter contributes nothing: the model computes its base (DPO's reference policy)."""
    adapted = [m for _, m in layers(model)]
    before = [m.enabled for m in adapted]
    for m in adapted:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(adapted, before):
            m.enabled = was


def merge_state(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A Transformer state dict with adapters (``<layer>.lora_a`` / ``.lora_b`` beside ``<layer>.weight``) folded
    into the weights: W + scale * B A, in W's dtype; the adapter keys are dropped."""
    merged = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key, a in state.items():
        if not key.endswith(".lora_a"):
            continue
        layer = key[: -len(".lora_a")]
        w = merged[f"{layer}.weight"]
        b = state[f"{layer}.lora_b"]
        merged[f"{layer}.weight"] = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)
    return merged
