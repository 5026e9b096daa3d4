"""Memory planner: what a training run needs per device, before anything is allocated.

The estimate behind `python -m llm.plan` and train.py's pre-flight check (`plan.check=false` skips it). Sizes are
printed in GB = 1e9 bytes.

The estimate, per device (P parameters, W devices = trainer.devices x trainer.num_nodes; e = bytes of the
compute dtype, 2 under bf16/16 precisions, else 4):
- weights, gradients: P x 4 bytes each (P x 2 under bf16-true/16-true); divided by W when sharded (FSDP);
- optimizer: AdamW's two moments, P x 8 bytes (P x 4 under *-true 16-bit precisions), divided by W when sharded.
  With the weights and gradients that makes the usual 16 bytes per parameter of mixed-precision training;
- activations: what autograd keeps for backward, counted tensor by tensor for our Block (see
  `block_activation_bytes`; a test checks it against the tensors autograd actually saves), times micro-batch x
  sequence length; with activation checkpointing, only each block's input plus one block being recomputed;
  plus the loss: at the start of backward the float32 log-probabilities, their gradient and the logits'
  gradient (3 x 4 bytes x vocabulary per token) are alive at once; with packed SFT or data.document_mask, the
  (B, 1, T, T) additive mask in the compute dtype and its boolean build temporaries (2 bytes per entry) where the
  attention is dense (the CPU, and CUDA below FLEX_MIN_LEN tokens; flex attention's block masks are small);
- buffers: under autocast (mixed precision, not sharded) the compute-dtype copy of every weight matrix, which the
  matmuls keep for backward; under DDP the gradient buckets (a second copy of the gradients); under FSDP two
  unsharded blocks in flight (the one computing and the one prefetched) with their unsharded gradients, and
  the unsharded embedding and output head (FSDP2 with a compute-dtype MixedPrecisionPolicy, as torchtitan does);
- optimizer step temporaries: a moment-sized copy for the foreach AdamW (CUDA's default), two copies of the
  largest tensor for the per-tensor loop (CPU's default), none for fused.

The peak is not the sum of these: gradients are freed by `zero_grad` (set to None) and rebuilt during
backward while the activations are being freed, so
    peak = weights + optimizer + buffers + max(activations, gradients + step temporaries),
with the gradients added to the activations when gradient accumulation keeps them across micro-batches.
A test runs real CPU training steps in a subprocess and compares this peak with the measured one.

With an adapter (`adapter=lora` / `qlora`, llm/core/lora.py) the base is frozen and only A (r, in) and B (out, r) of
each target of each block train: P_a = n_layers x sum over targets of r x (in + out) parameters.
- frozen weights: P, stored as llm/training/adapters.py stores them: bf16 on one GPU or DDP under bf16 precision,
  NF4 for QLoRA's targets (NF4_BYTES, about 4.13 bits), else the precision's dtype (fp32 on the CPU, fp32 and
  sharded under FSDP2);
- gradients, optimizer state and step temporaries: of the P_a adapter parameters only;
- activations: a frozen projection keeps nothing of its input (the input's gradient needs only the weight), but
  the gradient still flows through every block to the earlier adapters, so attention, SwiGLU and the norms keep
  what they keep in full training, and each adapter's A keeps its own input (see `adapter_block_activation_bytes`);
- buffers: autocast's 16-bit copies only of frozen weights stored in fp32 (a frozen weight's copy is not cached but
  is still saved for the backward of its input), the adapters' 16-bit copies, and the NF4 weight being
  dequantized; DDP's buckets and FSDP's gathered gradients hold the adapters' gradients only.

Not counted: the CUDA context and library workspaces (cuBLAS, NCCL), which live outside PyTorch's allocator;
allocator fragmentation; one-time runtime buffers (tens of MB on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from llm.core.config import ModelConfig
from llm.core.flops import (
    count_params,
    layer_norm_params,
    layer_params,
    matmul_params,
    norm_params,
)
from llm.core.masks import FLEX_MIN_LEN
from llm.errors import UserError

if TYPE_CHECKING:  # the planner reads the adapter's fields only: no torch here
    from llm.core.lora import LoRAConfig

GB = 10**9
# bitsandbytes NF4 with double quantization (QLoRA paper, section 2; llm/training/quantize.py): a 4-bit code per
# weight, an 8-bit scale per block of 64 weights, a float32 constant per 256 of those blocks: 4.127 bits per weight
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the parameters, gradients, each optimizer moment, and the compute dtype."""

    param: int
    grad: int
    moment: int
    compute: int
    bfloat16: bool = False  # the 16-bit dtype is bf16 (on the CPU, attention then computes in float32)

    @property
    def mixed(self) -> bool:  # autocast: float32 weights, 16-bit matmuls
        return self.compute < self.param


PRECISIONS = {
    "64-true": Precision(8, 8, 8, 8),
    "32-true": Precision(4, 4, 4, 4),
    "bf16-mixed": Precision(4, 4, 4, 2, bfloat16=True),
    "16-mixed": Precision(4, 4, 4, 2),
    "bf16-true": Precision(2, 2, 2, 2, bfloat16=True),
    "16-true": Precision(2, 2, 2, 2),
}
_ALIASES = {"64": "64-true", "32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def normalise_precision(precision: str | int | None) -> str:
    """Lightning's spelling of `trainer.precision` (``auto`` is resolved before: llm/app/spec.py)."""
    p = "32-true" if precision is None else _ALIASES.get(str(precision), str(precision))
    if p not in PRECISIONS:
        raise UserError(f"trainer.precision={precision!r}: the planner knows {', '.join(PRECISIONS)}")
    return p


def block_activation_bytes(cfg: ModelConfig, precision: Precision, device: str = "cuda") -> int:
    """Bytes autograd keeps per token for one Block during training (checked against saved tensors in a test).

    C = dim, KV = n_kv_heads * head_dim, F = ffn_dim, e = compute bytes:
    - each RMSNorm keeps its input and the normalised x before the gain, both in float32 (the norm computes in
      float32; under 16-bit weights its input is upcast to a new float32 tensor and x is cast back to 16 bits);
    - the matmul inputs: each norm's output, once per norm, or once per matmul under autocast, which casts the
      input separately for wq, wk and wv (3) and for w1 and w3 (2);
    - attention: q and k after rotary, v, and the output of SDPA (whose (B, T, H*D) view is wo's input), plus
      the float32 log-sum-exp per head; the rotary multiplications keep nothing per token. On the CPU under bf16
      autocast or bf16 weights, SDPA computes in float32 (llm/core/model.py attention_dtype): q, k, v and its
      output are kept in float32, and wo keeps its own bf16 input;
    - SwiGLU: w1 out, w3 out, silu(w1 out) and their product (w2's input);
    - with qk_norm, the per-head norms of q and k: their input (e bytes) and the float32 normalised x (the upcast
      itself when e = 4 is the input), plus one float32 rsqrt per head of q and of k;
    - dropout (only when model.dropout > 0): one mask per residual branch (1 byte on GPUs, e on the CPU); the
      dropout inside SDPA, which on the CPU falls back to a kernel keeping T x T probabilities, is not counted.
    """
    C, KV, F, e = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim, precision.compute
    if precision.mixed:
        norms = 2 * (4 * C + 4 * C)  # input (float32 residual stream) and normalised x, float32
        matmul_inputs = 5 * C * e  # autocast's per-matmul casts of the two norm outputs
    elif precision.param == 2:
        norms = 2 * (4 * C + 2 * C)  # the float32 upcast of the input, normalised x cast back to 16 bits
        matmul_inputs = 2 * C * e
    else:
        norms = 2 * (2 * C * precision.param)
        matmul_inputs = 2 * C * e
    attention = (2 * C + 2 * KV) * e + 4 * cfg.n_heads  # q, out; k, v; log-sum-exp
    if device == "cpu" and precision.bfloat16:
        attention += (2 * C + 2 * KV) * 2 + C * e  # the same four in float32, and wo's bf16 input
    feed_forward = 4 * F * e
    qk_norm = (C + KV) * (e + 4) + 4 * (cfg.n_heads + cfg.n_kv_heads) if cfg.qk_norm else 0
    attention += qk_norm
    dropout = 2 * C * (1 if device == "cuda" else e) if cfg.dropout > 0 else 0
    return norms + matmul_inputs + attention + feed_forward + dropout + 2 * 4  # + two float32 rsqrt per norm


def loss_bytes(cfg: ModelConfig, compute: int, device: str) -> int:
    """Bytes per token of the loss at its peak (start of backward), llm/training/cross_entropy.py: on a GPU the
    float32 log-probs (kept by log_softmax), their gradient and the logits' gradient; on the CPU the logits, which
    the chunked loss keeps, and their gradient, both in the compute dtype."""
    return 2 * compute * cfg.vocab_size if device == "cpu" else 3 * 4 * cfg.vocab_size


def head_activation_bytes(cfg: ModelConfig, precision: Precision, device: str = "cuda") -> int:
    """Bytes per token of the final norm, the output head's input and the loss at its peak (start of backward)."""
    C, e = cfg.dim, precision.compute
    norm = 2 * C * (4 if precision.mixed or precision.param == 2 else precision.param)
    head_input = C * e
    return norm + head_input + loss_bytes(cfg, e, device)


def muon_params(cfg: ModelConfig) -> int:
    """The weight matrices of the blocks (attention and MLP), which optim=muon updates with Muon."""
    return cfg.n_layers * (layer_params(cfg) - layer_norm_params(cfg))


def adapter_shapes(cfg: ModelConfig, adapter: LoRAConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted projection of one block, by target name."""
    C, HD, KV, F = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    shapes = {"wq": (C, HD), "wk": (C, KV), "wv": (C, KV), "wo": (HD, C), "w1": (C, F), "w3": (C, F), "w2": (F, C)}
    return {t: shapes[t] for t in adapter.targets}


def adapter_params(cfg: ModelConfig, adapter: LoRAConfig) -> int:
    """The trainable parameters: A (r, in) and B (out, r) of every target of every block."""
    return cfg.n_layers * sum(adapter.rank * (i + o) for i, o in adapter_shapes(cfg, adapter).values())


def target_params(cfg: ModelConfig, adapter: LoRAConfig) -> int:
    """The base weights of the targets (the ones QLoRA stores in NF4)."""
    return cfg.n_layers * sum(i * o for i, o in adapter_shapes(cfg, adapter).values())


def adapter_block_activation_bytes(
    cfg: ModelConfig, adapter: LoRAConfig, precision: Precision, stream: int, device: str = "cuda"
) -> int:
    """Bytes autograd keeps per token for one Block with a frozen base and adapters (checked in a test).

    stream: bytes of the residual stream and the norms' outputs (2 when the frozen base is stored in bf16, whose
    embedding then starts a bf16 stream). C = dim, F = ffn_dim, e = compute bytes, r = rank. The input of every
    block needs a gradient (the adapters before it train), so:
    - each RMSNorm keeps its float32 input (or its float32 upcast) and rsqrt, not the normalised x: its gain is frozen;
    - a frozen projection keeps nothing of its input (the input's gradient needs only the weight), but each adapter's
      A keeps its input for A's gradient: with adapter dropout, its own dropped copy (in e bytes; autocast's cast when
      the input is float32) and its mask (1 byte on GPUs, the input's dtype on the CPU); without dropout the input
      itself, shared by the targets that read it (once per target when autocast casts it); B keeps A's output (r);
    - attention as in full training: q and k after rotary, v, the SDPA output (wo's input), the log-sum-exp;
    - SwiGLU: w1 out, silu(w1 out) and w3 out; their product only as w2's adapter input. QLoRA's base returns its
      input's dtype (llm/training/quantize.py), so on a float32 stream an NF4 w1 / w3 gives float32 outputs;
    - with qk_norm, whose gains are frozen too: the float32 input (or upcast) of q's and k's norms and the rsqrt.
    The first block keeps less (its input needs no gradient): not subtracted.
    """
    C, HD, KV, F, e = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim, precision.compute
    targets = set(adapter.targets)
    sdpa_float32 = device == "cpu" and precision.bfloat16  # see block_activation_bytes; wo's input then apart

    def out_bytes(target: str, b_in: int) -> int:
        return b_in if adapter.quantize and target in targets else e

    def adapter_inputs(group: tuple[str, ...], d: int, b_in: int, kept: bool = False) -> int:
        """What the group's adapters keep of their d-wide input of b_in bytes (kept: saved anyway, by SDPA)."""
        k = len(targets.intersection(group))
        if adapter.dropout > 0:
            return k * d * (e + (1 if device == "cuda" else b_in))
        if b_in != e:  # autocast casts the float32 input once per matmul
            return k * d * e
        return d * e if k and not kept else 0

    b1, b3 = out_bytes("w1", stream), out_bytes("w3", stream)
    product = max(b1, b3)
    norms = 2 * (C * max(4, stream) + 4)
    inputs = (
        adapter_inputs(("wq", "wk", "wv"), C, stream)
        + adapter_inputs(("wo",), HD, e, kept=not sdpa_float32)
        + adapter_inputs(("w1", "w3"), C, stream)
        + adapter_inputs(("w2",), F, product)
    )
    lora_hidden = len(targets) * adapter.rank * e
    attention = (2 * HD + 2 * KV) * e + 4 * cfg.n_heads
    if sdpa_float32:
        attention += (2 * HD + 2 * KV) * 2
    if cfg.qk_norm:
        attention += (HD + KV) * 4 + 4 * (cfg.n_heads + cfg.n_kv_heads)
    feed_forward = F * (2 * b1 + b3)
    dropout = 2 * C * (1 if device == "cuda" else e) if cfg.dropout > 0 else 0
    return norms + inputs + lora_hidden + attention + feed_forward + dropout


def adapter_head_activation_bytes(cfg: ModelConfig, stream: int, compute: int, device: str = "cuda") -> int:
    """Per token: the final norm (frozen gain: its input and rsqrt), nothing for the frozen head, and the loss."""
    return cfg.dim * max(4, stream) + 4 + loss_bytes(cfg, compute, device)


@dataclass
class Plan:
    """Memory per device of one training configuration; the byte counts are filled in by __post_init__."""

    model: ModelConfig
    precision: str = "32-true"
    world_size: int = 1
    sharded: bool = False  # FSDP: weights, gradients and optimizer state divided over world_size
    activation_checkpointing: bool = False
    micro_batch: int = 1
    seq_len: int = 256
    grad_accumulation: int = 1
    accelerator: str = "cpu"  # "cpu" or "cuda"
    optimizer_impl: str = "auto"  # AdamW "fused", "foreach", "for-loop", or "auto" (PyTorch's default)
    optimizer_kind: str = "adamw"  # "adamw", or "muon": Muon on the blocks' matrices (one buffer), AdamW on the rest
    segment_mask: bool = False  # packed SFT, data.document_mask: a (B, 1, T, T) attention mask (llm/core/masks.py)
    device: str = "cpu (host memory)"
    device_memory: int = 0  # bytes
    adapter: LoRAConfig | None = None  # adapter=lora / qlora: the base frozen, only the adapters train
    data_parallel: int | None = None  # replicas reading their own batches (None: world_size), for the advice
    trainable_params: int = field(init=False, default=0)
    frozen_weights: int = field(init=False, default=0)  # bytes, within `weights`
    nf4_params: int = field(init=False, default=0)  # QLoRA: frozen weights stored in NF4
    base_bytes: int = field(init=False, default=0)  # bytes per frozen weight outside NF4
    weights: int = field(init=False, default=0)
    gradients: int = field(init=False, default=0)
    optimizer: int = field(init=False, default=0)
    activations: int = field(init=False, default=0)
    buffers: int = field(init=False, default=0)
    step_temporaries: int = field(init=False, default=0)
    buffer_kind: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.model.vocab_size is None:
            raise UserError("plan: model.vocab_size is unknown (set model.vocab_size or data.vocab_size)")
        self.precision = normalise_precision(self.precision)
        for name in ("world_size", "micro_batch", "seq_len", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise UserError(f"plan: {name}={getattr(self, name)} must be >= 1")
        if self.seq_len > self.model.max_seq_len:
            raise UserError(f"data.seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        prec, m, a = PRECISIONS[self.precision], self.model, self.adapter
        P = count_params(m)
        shard = self.world_size if self.sharded else 1
        stream = 4 if prec.mixed else prec.param  # bytes of the residual stream
        if a is None:
            trainable = P
        else:
            trainable = adapter_params(m, a)
            self.nf4_params = target_params(m, a) if a.quantize else 0
            # as llm/training/adapters.py prepare_base stores the frozen weights
            bf16_base = self.accelerator == "cuda" and self.precision.startswith("bf16")
            self.base_bytes = 2 if bf16_base and not self.sharded else prec.param
            frozen = (P - self.nf4_params) * self.base_bytes + self.nf4_params * NF4_BYTES
            self.frozen_weights = math.ceil(frozen / shard)
            if not self.sharded and self.base_bytes == 2:
                stream = 2  # a bf16 embedding starts a bf16 stream
        self.trainable_params = trainable
        self.weights = self.frozen_weights + math.ceil(trainable * prec.param / shard)
        self.gradients = math.ceil(trainable * prec.grad / shard)
        muon = muon_params(m) if self.optimizer_kind == "muon" and a is None else 0  # adapters train with AdamW
        self.optimizer = math.ceil((2 * trainable - muon) * prec.moment / shard)  # Muon keeps one buffer, not two

        if a is None:
            block, head = (
                block_activation_bytes(m, prec, self.accelerator),
                head_activation_bytes(m, prec, self.accelerator),
            )
        else:
            block = adapter_block_activation_bytes(m, a, prec, stream, self.accelerator)
            head = adapter_head_activation_bytes(m, stream, prec.compute, self.accelerator)
        if self.activation_checkpointing:  # each block's input, and one block's activations while it is recomputed
            per_token = m.n_layers * m.dim * stream + block
        else:
            per_token = m.n_layers * block
        self.activations = self.micro_batch * self.seq_len * (per_token + head)
        dense = self.accelerator != "cuda" or self.seq_len < FLEX_MIN_LEN or m.dropout > 0  # else flex: block masks
        if self.segment_mask and dense:  # the additive mask, kept for backward, and its boolean build temporaries
            self.activations += self.micro_batch * self.seq_len**2 * (prec.compute + 2)

        norms = norm_params(m)  # gains, used elementwise: never cast nor matmul'd
        embed_and_head = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
        kinds = []
        if self.sharded:  # FSDP2 gathers frozen and trainable weights alike; gradients exist for the trainable only
            block_trainable = layer_params(m) if a is None else trainable // m.n_layers
            block_params = layer_params(m) + (0 if a is None else block_trainable)
            self.buffers = 2 * (block_params * prec.compute + block_trainable * prec.grad)
            self.buffers += embed_and_head * prec.compute
            kinds.append("2 gathered blocks + grads; embed, head")
        else:
            if prec.mixed and a is None:
                self.buffers = (matmul_params(m) - norms) * prec.compute
                kinds.append("autocast 16-bit copy of the weights" if self.world_size == 1 else "autocast copy")
            elif prec.mixed:  # frozen weights stored in fp32 are cast at every use, and the copy kept for backward
                fp32_base = (matmul_params(m) - norms - self.nf4_params) if self.base_bytes > prec.compute else 0
                self.buffers = (fp32_base + trainable) * prec.compute
                kinds.append("16-bit: adapters" + (", fp32 base" if fp32_base else ""))
            if a is not None and a.quantize:  # one target's weight dequantized to bf16 at a time
                self.buffers += max(i * o for i, o in adapter_shapes(m, a).values()) * 2
                kinds.append("NF4 dequant")
            if self.world_size > 1:
                self.buffers += trainable * prec.grad
                kinds.append("DDP grad buckets")
        self.buffer_kind = " + ".join(kinds)

        impl = self.optimizer_impl
        if impl == "auto":  # torch.optim picks foreach for tensors on CUDA, the per-tensor loop otherwise
            impl = "foreach" if self.accelerator == "cuda" else "for-loop"
        if impl == "foreach":
            self.step_temporaries = math.ceil(trainable * prec.moment / shard)
        elif impl == "for-loop":
            if a is None:
                largest = max(m.vocab_size * m.dim, m.dim * m.ffn_dim)
            else:
                largest = a.rank * max(max(shape) for shape in adapter_shapes(m, a).values())
            self.step_temporaries = math.ceil(2 * largest * prec.moment / shard)
        if muon:  # the largest matrix's update, whole even under FSDP, and its bf16 Newton-Schulz iterates
            rows, cols = max(((m.dim, m.ffn_dim), (m.dim, m.n_heads * m.head_dim)), key=lambda s: s[0] * s[1])
            small = min(rows, cols)
            self.step_temporaries = max(self.step_temporaries, rows * cols * (4 + 2 * 2) + 2 * small * small * 2)

    @property
    def params(self) -> int:
        return count_params(self.model)

    @property
    def total(self) -> int:
        """The estimated peak per device (see the module docstring)."""
        backward = self.activations + (self.gradients if self.grad_accumulation > 1 else 0)
        step = self.gradients + self.step_temporaries
        return self.weights + self.optimizer + self.buffers + max(backward, step)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    @property
    def strategy(self) -> str:
        if self.sharded:
            return f"FSDP, sharded over {self.world_size} devices"
        return f"DDP over {self.world_size} devices" if self.world_size > 1 else "single device"

    def alternatives(self) -> list[tuple[str, Plan, str]]:
        """(overrides, their plan, why) for a run that does not fit: the largest smaller micro-batch that fits (else
        1) with the same samples per optimizer step, and activation checkpointing, which only trainer=fsdp applies
        (llm/training/parallelize.py)."""
        found = []
        samples = self.micro_batch * self.grad_accumulation * (self.data_parallel or self.world_size)
        for b in (b for b in range(self.micro_batch - 1, 0, -1) if self.micro_batch % b == 0):
            p = replace(self, micro_batch=b, grad_accumulation=self.grad_accumulation * self.micro_batch // b)
            if p.fits or b == 1:
                why = f"{p.grad_accumulation} micro-batches of {b} per optimizer step"
                found.append((f"data.batch_size={b} data.global_batch_size={samples}", p, why))
                break
        qlora = self.adapter is not None and self.adapter.quantize is not None  # its NF4 base is not FSDP-sharded
        if not self.activation_checkpointing and not (qlora and not self.sharded):
            key = "trainer.strategy.activation_checkpointing=true"
            if self.sharded:
                found.append((key, replace(self, activation_checkpointing=True), ""))
            else:
                devices = " trainer.devices=1" if self.world_size == 1 else ""
                base = "; the frozen base stays fp32 there, sharded" if self.adapter is not None else ""
                p = replace(self, sharded=True, activation_checkpointing=True)
                found.append((f"trainer=fsdp{devices} {key}", p, f"only trainer=fsdp checkpoints activations{base}"))
        return found

    def report(self) -> str:
        """The breakdown `python -m llm.plan` prints (llm/core/memory_report.py)."""
        from llm.core.memory_report import report

        return report(self)


def check(plan: Plan) -> None:
    """Refuse a run that will not fit, with one line naming the shortfall (and what fits, when something does)."""
    if not plan.fits:
        fitting = [keys for keys, p, _ in plan.alternatives() if p.fits]
        raise UserError(
            f"plan: the run needs about {plan.total / GB:.1f} GB per device but {plan.device} has "
            f"{plan.device_memory / GB:.1f} GB (short by {(plan.total - plan.device_memory) / GB:.1f} GB); "
            + (f"{fitting[0]} fits; " if fitting else "")
            + "use a smaller model or micro-batch, shard with trainer=fsdp, "
            "or skip this check with plan.check=false (python -m llm.plan shows the breakdown)"
        )
