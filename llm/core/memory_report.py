"""The planner's report: the table `python -m llm.plan` prints for one Plan (llm/core/memory.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from llm.core.flops import count_params, flops_per_token, matmul_params
from llm.core.memory import GB, NF4_BYTES, PRECISIONS

if TYPE_CHECKING:
    from llm.core.memory import Plan


def report(plan: Plan) -> str:
    """Parameters, FLOPs, the run and the memory per device, row by row, with the verdict and what fits instead."""
    m, prec, a = plan.model, PRECISIONS[plan.precision], plan.adapter
    P, shard = plan.params, plan.world_size if plan.sharded else 1
    N = plan.trainable_params
    tokens = plan.micro_batch * plan.seq_len
    fpt = flops_per_token(m, plan.seq_len)
    dtype = {8: "fp64", 4: "fp32", 2: "bf16" if plan.precision.startswith("bf16") else "16-bit"}
    unit, scale = ("GB", GB) if plan.total >= GB else ("MB", 10**6)

    def row(name: str, what: str, n: float, unsharded: float | None = None) -> str:
        line = f"  {name:<12}{what:<46}{n / scale:10.2f}"
        return line + (f"{unsharded / scale:12.2f}" if shard > 1 and unsharded is not None else "")

    state_bytes = prec.param + prec.grad + 2 * prec.moment
    if plan.optimizer_kind == "muon" and a is None:  # one buffer per matrix entry: a mean over all parameters
        state_bytes = round(prec.param + prec.grad + plan.optimizer * shard / max(1, N), 1)
    lines = [
        f"model        dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv, head_dim "
        f"{m.head_dim}), ffn {m.ffn_dim}, vocab {m.vocab_size}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings, max_seq_len {m.max_seq_len}",
        f"parameters   {P:,} ({_count(P)}), non-embedding {count_params(m, embedding=False):,}; "
        f"the weights alone: {P * 2 / scale:.3g} {unit} in bf16, {P * 4 / scale:.3g} {unit} in fp32",
    ]
    if a is not None:
        lines.append(
            f"adapter      {'QLoRA' if a.quantize else 'LoRA'} rank {a.rank} (alpha {a.alpha:g}, dropout "
            f"{a.dropout:g}) on {' '.join(a.targets)} of {m.n_layers} blocks: {N:,} trainable parameters "
            f"({100 * N / P:.2f}% of the base), the base frozen"
        )
    lines += [
        f"FLOPs        {fpt:.3e} per token (training, 6N + attention: N = {_count(matmul_params(m))} matmul "
        f"parameters, seq_len {plan.seq_len}); {fpt * tokens:.3e} per micro-batch",
        f"run          {plan.precision}, {plan.strategy}, micro-batch {plan.micro_batch} x {plan.seq_len} "
        f"tokens, gradient accumulation {plan.grad_accumulation}, activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}",
        "",
        f"memory ({unit} = 1e{9 if unit == 'GB' else 6} bytes){'':<35}{'per device':>10}"
        + (f"{'unsharded':>12}" if shard > 1 else ""),
    ]
    only = "" if a is None else " (adapters)"  # gradients and optimizer state: of the trainable only
    if a is None:
        lines.append(row("weights", f"{dtype[prec.param]}, {prec.param} B/param", plan.weights, P * prec.param))
    else:
        nf4, rest = plan.nf4_params, P - plan.nf4_params
        if nf4:
            lines.append(
                row("frozen", f"{_count(nf4)} targets, NF4, {8 * NF4_BYTES:.2f} bit/param", nf4 * NF4_BYTES / shard)
            )
        what = f"{_count(rest)} {'others' if nf4 else 'base'}, {dtype[plan.base_bytes]}, {plan.base_bytes} B/param"
        lines.append(row("" if nf4 else "frozen", what, rest * plan.base_bytes / shard, rest * plan.base_bytes))
        lines.append(
            row("trainable", f"{_count(N)} adapters, {dtype[prec.param]}, {prec.param} B/param",
                plan.weights - plan.frozen_weights, N * prec.param)
        )  # fmt: skip
    lines += [
        row("gradients", f"{dtype[prec.grad]}, {prec.grad} B/param{only}", plan.gradients, N * prec.grad),
        row(
            "optimizer",
            f"AdamW moments{only}, 2 x {dtype[prec.moment]}, {2 * prec.moment} B/param"
            if plan.optimizer == math.ceil(2 * N * prec.moment / shard)
            else f"Muon 1 x {dtype[prec.moment]} (matrices), AdamW 2 x (rest)",
            plan.optimizer,
            plan.optimizer * shard,
        ),
        row(
            "",
            f"{'adapter ' if a else ''}states: {state_bytes} B/param",
            plan.weights - plan.frozen_weights + plan.gradients + plan.optimizer,
            N * state_bytes,
        ),
        row("activations", f"{tokens} tokens x {plan.activations / tokens / 1e6:.3g} MB", plan.activations),
        row("buffers", plan.buffer_kind or "-", plan.buffers),
        row("step temps", "optimizer step", plan.step_temporaries),
        row("peak", "weights + optimizer + buffers + max(", plan.total),
        f"  {'':<12}activations{' + gradients' if plan.grad_accumulation > 1 else ''}, gradients + step temps)",
        "",
    ]
    verdict = "fits" if plan.fits else f"does NOT fit (short by {(plan.total - plan.device_memory) / GB:.2f} GB)"
    lines.append(
        f"device       {plan.device}: {plan.device_memory / GB:.1f} GB ({plan.device_memory / 2**30:.1f} GiB)"
        f" -> {verdict}"
    )
    for i, (keys, p, why) in enumerate([] if plan.fits else plan.alternatives()):
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(
            f"{'instead' if i == 0 else '':<13}{keys}: {p.total / GB:.2f} GB -> {verdict}" + (why and f" ({why})")
        )
    return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M"
