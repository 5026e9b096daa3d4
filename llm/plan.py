"""Memory planner: what a run needs per device, before anything is allocated.

`python -m llm.plan [the overrides of train.py]` prints parameters, FLOPs per token and memory per device,
then whether the run fits; `train.py` calls `check()` before building the model (`plan.check=false` skips).

The estimate, per device, in bytes (P parameters, W data-parallel world size, e bytes of the compute dtype):
- weights, gradients, optimizer: P x (param bytes, grad bytes, 2 AdamW moments); divided by W when sharded
  (FSDP), plus, under FSDP, two unsharded blocks in flight (the one computing and the one prefetched);
  under DDP, the gradient buckets (a second copy of the gradients);
- activations: what autograd saves per token for backward, counted tensor by tensor for our block (below),
  times micro-batch x sequence length; with activation checkpointing only each block's input is kept,
  plus one block recomputed at a time; plus the output head (logits in the compute dtype, their float32
  copy and log-softmax for the loss);
- the autocast weight cache under mixed precision (a compute-dtype copy of every weight matrix).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from llm.config import ModelConfig, pad_vocab
from llm.errors import UserError
from llm.flops import count_params, flops_per_token, layer_params
from llm.hardware import device_memory_bytes

GIB = 1024**3
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/, as train.py composes it

# bytes of (parameters, gradients, each optimizer moment, activations) per precision setting
_PRECISION = {
    "32-true": (4, 4, 4, 4),
    "bf16-mixed": (4, 4, 4, 2),
    "16-mixed": (4, 4, 4, 2),
    "bf16-true": (2, 2, 2, 2),
    "16-true": (2, 2, 2, 2),
}
_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def normalise_precision(precision: str | int | None) -> str:
    p = "32-true" if precision is None else _ALIASES.get(str(precision), str(precision))
    if p not in _PRECISION:
        raise UserError(f"trainer.precision={precision!r}: the planner knows {', '.join(_PRECISION)}")
    return p


def block_activation_bytes(cfg: ModelConfig, e: int, r: int) -> int:
    """Bytes autograd keeps per token for one block: e = compute dtype bytes, r = residual stream bytes."""
    kv = cfg.n_kv_heads * cfg.head_dim
    saved_e = (
        cfg.dim  # attention_norm output (input of wq, wk, wv)
        + cfg.dim + 2 * kv  # q, k, v after rope (kept by SDPA)
        + 2 * cfg.dim  # SDPA output and its (B, T, H*D) contiguous copy, the input of wo
        + cfg.dim  # ffn_norm output (input of w1, w3)
        + 4 * cfg.ffn_dim  # w1 out, w3 out, silu(w1 out), their product (input of w2)
    )
    saved_r = 2 * cfg.dim  # the two RMSNorm inputs, in the residual stream's dtype (float32 math inside)
    dropout = (3 * cfg.dim) if cfg.dropout > 0 else 0  # one byte per element of each dropout mask
    return saved_e * e + saved_r * r + dropout


@dataclass
class Plan:
    model: ModelConfig
    precision: str
    world_size: int
    sharded: bool
    activation_checkpointing: bool
    micro_batch: int
    seq_len: int
    device: str
    device_memory: int  # bytes
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    buffers: int = 0  # DDP buckets / FSDP unsharded blocks / autocast weight copies

    def __post_init__(self) -> None:
        p_bytes, g_bytes, m_bytes, e = _PRECISION[self.precision]
        P = count_params(self.model)
        shard = self.world_size if self.sharded else 1
        self.weights = math.ceil(P * p_bytes / shard)
        self.gradients = math.ceil(P * g_bytes / shard)
        self.optimizer = math.ceil(2 * P * m_bytes / shard)

        tokens = self.micro_batch * self.seq_len
        block = block_activation_bytes(self.model, e, p_bytes)
        if self.activation_checkpointing:
            per_token = self.model.n_layers * self.model.dim * p_bytes + block  # block inputs + one recompute
        else:
            per_token = self.model.n_layers * block
        head = self.model.dim * (p_bytes + e) + self.model.vocab_size * (e + 4 + 4)  # final norm, logits, CE
        self.activations = tokens * (per_token + head)

        layer = layer_params(self.model)
        if self.sharded:
            self.buffers = 2 * layer * (e + g_bytes)  # two gathered blocks and their unsharded gradients
        elif self.world_size > 1:
            self.buffers = P * g_bytes  # DDP gradient buckets
        if e < p_bytes and not self.sharded:  # autocast caches a low-precision copy of each weight matrix
            self.buffers += (P - self.model.vocab_size * self.model.dim) * e

    @property
    def params(self) -> int:
        return count_params(self.model)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    def report(self) -> str:
        m = self.model
        strategy = f"FSDP over {self.world_size}" if self.sharded else ("DDP" if self.world_size > 1 else "single")
        lines = [
            f"model      dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), ffn {m.ffn_dim}, "
            f"vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'}",
            f"parameters {self.params:,} total, {count_params(m, embedding=False):,} non-embedding",
            f"FLOPs      {flops_per_token(m, self.seq_len):.4g} per token (training, seq_len {self.seq_len}); "
            f"{flops_per_token(m, self.seq_len) * self.micro_batch * self.seq_len:.4g} per micro-batch",
            f"run        {self.precision}, {strategy} (world size {self.world_size}), micro-batch {self.micro_batch} x "
            f"{self.seq_len} tokens, activation checkpointing {'on' if self.activation_checkpointing else 'off'}",
            "memory per device:",
        ]
        for name in ("weights", "gradients", "optimizer", "activations", "buffers"):
            lines.append(f"  {name:<12}{getattr(self, name) / GIB:10.2f} GiB")
        lines.append(f"  {'total':<12}{self.total / GIB:10.2f} GiB")
        verdict = "fits" if self.fits else f"does NOT fit (short by {(self.total - self.device_memory) / GIB:.2f} GiB)"
        lines.append(f"device     {self.device}: {self.device_memory / GIB:.2f} GiB -> {verdict}")
        return "\n".join(lines)


def _world_size(trainer: DictConfig, accelerator: str) -> int:
    devices = trainer.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if accelerator == "cuda" else 1
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer.get("num_nodes", 1) or 1)


def _accelerator(trainer: DictConfig) -> str:
    acc = str(trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def plan_from_config(cfg: DictConfig, vocab_size: int | None = None) -> Plan:
    """The plan of the run `cfg` describes. ``vocab_size``: the tokenizer's, when already known."""
    from hydra.utils import instantiate

    model = instantiate(cfg.model, _convert_="all")
    if model.vocab_size is None:
        model = model.with_vocab(vocab_size or pad_vocab(int(cfg.data.get("vocab_size") or 32000)))
    trainer = cfg.trainer
    strategy = trainer.get("strategy", "auto")
    strategy_name = str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy).lower()
    sharded = "fsdp" in strategy_name or "modelparallel" in strategy_name
    checkpointing = bool(isinstance(strategy, DictConfig) and strategy.get("activation_checkpointing", False))
    accelerator = _accelerator(trainer)
    device = torch.device(accelerator, 0) if accelerator == "cuda" else torch.device("cpu")
    memory_gb = cfg.get("plan", {}).get("device_memory_gb")
    memory = int(memory_gb * GIB) if memory_gb else device_memory_bytes(device)
    name = torch.cuda.get_device_name(device) if accelerator == "cuda" else "cpu (host memory)"
    return Plan(
        model=model,
        precision=normalise_precision(trainer.get("precision")),
        world_size=_world_size(trainer, accelerator),
        sharded=sharded,
        activation_checkpointing=checkpointing,
        micro_batch=int(cfg.data.batch_size),
        seq_len=int(cfg.data.seq_len),
        device=name,
        device_memory=memory,
    )


def check(plan: Plan) -> None:
    """Refuse a run that will not fit, with one line naming the shortfall."""
    if not plan.fits:
        raise UserError(
            f"plan: the run needs about {plan.total / GIB:.1f} GiB per device but {plan.device} has "
            f"{plan.device_memory / GIB:.1f} GiB (short by {(plan.total - plan.device_memory) / GIB:.1f} GiB); "
            "use a smaller model or batch, shard with trainer=fsdp, or skip this check with plan.check=false"
        )


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from llm import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(sys.argv[1:] if argv is None else argv))
    try:
        print(plan_from_config(cfg).report())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
