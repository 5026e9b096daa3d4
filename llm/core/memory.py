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
  gradient (3 x 4 bytes x vocabulary per token) are alive at once;
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

Not counted: the CUDA context and library workspaces (cuBLAS, NCCL), which live outside PyTorch's allocator;
allocator fragmentation; one-time runtime buffers (tens of MB on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llm.core.config import ModelConfig
from llm.core.flops import count_params, flops_per_token, layer_params, matmul_params
from llm.errors import UserError

GB = 10**9


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the parameters, gradients, each optimizer moment, and the compute dtype."""

    param: int
    grad: int
    moment: int
    compute: int

    @property
    def mixed(self) -> bool:  # autocast: float32 weights, 16-bit matmuls
        return self.compute < self.param


PRECISIONS = {
    "64-true": Precision(8, 8, 8, 8),
    "32-true": Precision(4, 4, 4, 4),
    "bf16-mixed": Precision(4, 4, 4, 2),
    "16-mixed": Precision(4, 4, 4, 2),
    "bf16-true": Precision(2, 2, 2, 2),
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
      the float32 log-sum-exp per head; the rotary multiplications keep nothing per token;
    - SwiGLU: w1 out, w3 out, silu(w1 out) and their product (w2's input);
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
    feed_forward = 4 * F * e
    dropout = 2 * C * (1 if device == "cuda" else e) if cfg.dropout > 0 else 0
    return norms + matmul_inputs + attention + feed_forward + dropout + 2 * 4  # + two float32 rsqrt per norm


def head_activation_bytes(cfg: ModelConfig, precision: Precision) -> int:
    """Bytes per token of the final norm, the output head's input and the loss at its peak (start of backward)."""
    C, e = cfg.dim, precision.compute
    norm = 2 * C * (4 if precision.mixed or precision.param == 2 else precision.param)
    head_input = C * e
    loss = 3 * 4 * cfg.vocab_size  # float32 log-probs (kept by log_softmax), their gradient, the logits' gradient
    return norm + head_input + loss


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
    device: str = "cpu (host memory)"
    device_memory: int = 0  # bytes
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
        prec, m = PRECISIONS[self.precision], self.model
        P = count_params(m)
        shard = self.world_size if self.sharded else 1
        self.weights = math.ceil(P * prec.param / shard)
        self.gradients = math.ceil(P * prec.grad / shard)
        self.optimizer = math.ceil(2 * P * prec.moment / shard)

        block = block_activation_bytes(m, prec, self.accelerator)
        if self.activation_checkpointing:  # each block's input, and one block's activations while it is recomputed
            residual = 4 if prec.mixed else prec.param
            per_token = m.n_layers * m.dim * residual + block
        else:
            per_token = m.n_layers * block
        self.activations = self.micro_batch * self.seq_len * (per_token + head_activation_bytes(m, prec))

        norms = (2 * m.n_layers + 1) * m.dim  # gains, used elementwise: never cast nor matmul'd
        embed_and_head = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
        if self.sharded:
            block_params = layer_params(m)
            self.buffers = 2 * block_params * (prec.compute + prec.grad) + embed_and_head * prec.compute
            self.buffer_kind = "2 gathered blocks + grads; embed, head"
        else:
            if prec.mixed:
                self.buffers = (matmul_params(m) - norms) * prec.compute
                self.buffer_kind = "autocast 16-bit copy of the weights"
            if self.world_size > 1:
                self.buffers += P * prec.grad
                self.buffer_kind = "autocast copy + DDP grad buckets" if prec.mixed else "DDP gradient buckets"

        impl = self.optimizer_impl
        if impl == "auto":  # torch.optim picks foreach for tensors on CUDA, the per-tensor loop otherwise
            impl = "foreach" if self.accelerator == "cuda" else "for-loop"
        if impl == "foreach":
            self.step_temporaries = math.ceil(P * prec.moment / shard)
        elif impl == "for-loop":
            largest = max(m.vocab_size * m.dim, m.dim * m.ffn_dim)
            self.step_temporaries = math.ceil(2 * largest * prec.moment / shard)

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

    def report(self) -> str:
        m, prec = self.model, PRECISIONS[self.precision]
        P, shard = self.params, self.world_size if self.sharded else 1
        tokens = self.micro_batch * self.seq_len
        fpt = flops_per_token(m, self.seq_len)
        dtype = {8: "fp64", 4: "fp32", 2: "16-bit"}
        unit, scale = ("GB", GB) if self.total >= GB else ("MB", 10**6)

        def row(name: str, what: str, n: float, unsharded: float | None = None) -> str:
            line = f"  {name:<12}{what:<38}{n / scale:10.2f}"
            return line + (f"{unsharded / scale:12.2f}" if shard > 1 and unsharded is not None else "")

        state_bytes = prec.param + prec.grad + 2 * prec.moment
        lines = [
            f"model        dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv, head_dim "
            f"{m.head_dim}), ffn {m.ffn_dim}, vocab {m.vocab_size}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings, max_seq_len {m.max_seq_len}",
            f"parameters   {P:,} ({_count(P)}), non-embedding {count_params(m, embedding=False):,}; "
            f"the weights alone: {P * 2 / scale:.3g} {unit} in bf16, {P * 4 / scale:.3g} {unit} in fp32",
            f"FLOPs        {fpt:.3e} per token (training, 6N + attention: N = {_count(matmul_params(m))} matmul "
            f"parameters, seq_len {self.seq_len}); {fpt * tokens:.3e} per micro-batch",
            f"run          {self.precision}, {self.strategy}, micro-batch {self.micro_batch} x {self.seq_len} "
            f"tokens, gradient accumulation {self.grad_accumulation}, activation checkpointing "
            f"{'on' if self.activation_checkpointing else 'off'}",
            "",
            f"memory ({unit} = 1e{9 if unit == 'GB' else 6} bytes){'':<27}{'per device':>10}"
            + (f"{'unsharded':>12}" if shard > 1 else ""),
            row("weights", f"{dtype[prec.param]}, {prec.param} B/param", self.weights, P * prec.param),
            row("gradients", f"{dtype[prec.grad]}, {prec.grad} B/param", self.gradients, P * prec.grad),
            row(
                "optimizer",
                f"AdamW moments, 2 x {dtype[prec.moment]}, {2 * prec.moment} B/param",
                self.optimizer,
                2 * P * prec.moment,
            ),
            row("", f"states: {state_bytes} B/param", self.weights + self.gradients + self.optimizer, P * state_bytes),
            row("activations", f"{tokens} tokens x {self.activations / tokens / 1e6:.3g} MB", self.activations),
            row("buffers", self.buffer_kind or "-", self.buffers),
            row("step temps", "optimizer step", self.step_temporaries),
            row("peak", "weights + optimizer + buffers + max(", self.total),
            f"  {'':<12}activations{' + gradients' if self.grad_accumulation > 1 else ''}, gradients + step temps)",
            "",
        ]
        verdict = "fits" if self.fits else f"does NOT fit (short by {(self.total - self.device_memory) / GB:.2f} GB)"
        lines.append(
            f"device       {self.device}: {self.device_memory / GB:.1f} GB ({self.device_memory / 2**30:.1f} GiB)"
            f" -> {verdict}"
        )
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M"


def check(plan: Plan) -> None:
    """Refuse a run that will not fit, with one line naming the shortfall."""
    if not plan.fits:
        raise UserError(
            f"plan: the run needs about {plan.total / GB:.1f} GB per device but {plan.device} has "
            f"{plan.device_memory / GB:.1f} GB (short by {(plan.total - plan.device_memory) / GB:.1f} GB); "
            "use a smaller model or micro-batch, shard with trainer=fsdp, "
            "or skip this check with plan.check=false (python -m llm.plan shows the breakdown)"
        )
