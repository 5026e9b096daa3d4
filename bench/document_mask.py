"""Pretraining speed with document masking (data.document_mask=true) against without, on the CPU.

    python bench/document_mask.py [--steps 40 --warmup 3] [--threads N --clock wall] [--set KEY=VALUE ...]
                                  [--no-attention]

The run is the default pretraining's: model=tiny, data=corpus (the embedded corpus, paragraph documents, its
data.seq_len and data.batch_size), the precision train.py resolves (``auto``), composed and resolved as train.py
does (``run_spec`` of bench/train_cpu.py), the DataModule and the CausalLM built by the run's experiment. Variants,
each a DataModule over the same prepared corpus (the mask is not part of its cache key), so each trains on the same
windows in the same order:

- ``off``: ``data.document_mask=false``, the batches of today: SDPA's causal kernel (``is_causal``, no mask);
- ``mask``: ``data.document_mask=true``: ``segments`` and ``positions`` in every batch, the model's (B, 1, T, T)
  block-diagonal mask, additive, built once per forward and read by SDPA in every layer;
- ``mask-no-pos``: the same ``segments`` without ``positions``: rotary attention depends only on the distance
  between two positions, so inside a segment the default 0..T-1 give the same scores as positions restarting at
  0; this variant separates the cost of the per-row rotary tables (B, 1, T, D) from that of the mask.

Each variant trains its own model from the same initial weights (seeded before each is built): the batch fetched
from its train loader, CausalLM's forward with the batch's ``positions`` and ``segments`` (what training_step
passes), the loss, backward, clipping and the module's own optimizer (``configure_optimizers``, at the peak
learning rate: a schedule does not change the speed). The variants take turns step by step (the order reversed
every other step), so a busy spell of a shared machine slows each of them alike, and each step is timed alone.
Prints per variant: tokens/s (tokens per step over the median step time), the ratio to ``off`` (median over steps of
the ratio of the two variants' times at that step, and its quartiles), the median time spent fetching the batch (ms; its
segments and positions are computed there), and the mean loss of the last 10 steps. Unless ``--no-attention``, it
then times one attention call alone (forward and backward, the model's shapes and dtype, the first batch's
segments): SDPA causal, with the additive mask the model passes, and with the boolean mask.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.pretrain import PretrainDataModule
from llm.app.spec import RunSpec
from llm.training.module import CausalLM

# name: (override, whether the batch's positions reach the model)
VARIANTS = {
    "off": ("data.document_mask=false", True),
    "mask": ("data.document_mask=true", True),
    "mask-no-pos": ("data.document_mask=true", False),
}


@dataclass
class Trainee:
    """One variant's model, optimizer and batches, and what its steps measured."""

    module: CausalLM
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict[str, torch.Tensor]]
    positions: bool
    clip: float | None
    step_seconds: list[float] = field(default_factory=list)
    data_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_step: int = 0


def batches(dm: PretrainDataModule) -> Iterator[dict[str, torch.Tensor]]:
    """The train loader's batches, epoch after epoch."""
    while True:
        yield from dm.train_dataloader()


def trainee(spec: RunSpec, dm: PretrainDataModule, positions: bool) -> Trainee:
    L.seed_everything(spec.seed, verbose=False)  # the same initial weights for every variant
    module = spec.experiment.build_module(spec, dm)
    module.configure_model()
    module.train()
    module.scheduler_factory = None  # no Trainer to size a schedule; the learning rate does not change the speed
    optimizer = module.configure_optimizers()["optimizer"]
    clip = spec.cfg.trainer.get("gradient_clip_val")
    return Trainee(module, optimizer, batches(dm), positions, None if clip is None else float(clip))


def step(t: Trainee, autocast: Callable[[], contextlib.AbstractContextManager], clock: Callable[[], float]) -> None:
    """One training step of ``t``, timed from fetching the batch to the optimizer's step."""
    start = clock()
    batch = next(t.batches)
    fetched = clock()
    with autocast():
        positions = batch.get("positions") if t.positions else None
        logits = t.module(batch["input_ids"], positions, batch.get("segments"))
        loss = t.module.loss(logits, batch["labels"])
    loss.backward()
    if t.clip:
        torch.nn.utils.clip_grad_norm_(t.module.parameters(), t.clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.losses.append(loss.item())  # the step's end: a host sync, as the clock needs
    t.step_seconds.append(clock() - start)
    t.data_seconds.append(fetched - start)
    t.tokens_per_step = batch["input_ids"].numel()


def attention_times(spec: RunSpec, batch: dict[str, torch.Tensor], repeats: int, clock: Callable[[], float]) -> None:
    """One attention call, forward and backward, at the model's shapes and dtype: causal, additive mask, bool mask."""
    m = spec.model
    B, T = batch["input_ids"].shape
    dtype = torch.bfloat16 if spec.precision == "bf16-mixed" else torch.float32
    g = torch.Generator().manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(B, heads, T, m.head_dim, generator=g).to(dtype).requires_grad_()

    q, k, v = tensor(m.n_heads), tensor(m.n_kv_heads), tensor(m.n_kv_heads)
    # the model's block-diagonal causal rule (segment_mask in llm/core), written out: the model's module for masks
    # is being moved, and the timing below needs only the mask itself
    segments, pos = batch["segments"], torch.arange(T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    allowed = ((pos[None, :] <= pos[:, None]) & same).unsqueeze(1)  # (B, 1, T, T) bool
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(allowed.logical_not(), float("-inf"))
    cases = {
        "causal": {"is_causal": True},
        "additive mask": {"attn_mask": additive},
        "bool mask": {"attn_mask": allowed},
    }
    gqa = {"enable_gqa": True} if m.n_kv_heads != m.n_heads else {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats + 1):  # the first repeat warms up
        for name in list(cases)[:: -1 if r % 2 else 1]:
            start = clock()
            y = F.scaled_dot_product_attention(q, k, v, **cases[name], **gqa)
            y.float().sum().backward()
            if r:
                times[name].append(clock() - start)
    causal = statistics.median(times["causal"])
    print(f"\nattention alone (B={B}, H={m.n_heads}, KV={m.n_kv_heads}, T={T}, D={m.head_dim}, {dtype}), fwd+bwd:")
    for name, ts in times.items():
        print(f"{name:<14} | {1e3 * statistics.median(ts):7.2f} ms | {statistics.median(ts) / causal:5.2f}x causal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU time")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--no-attention", action="store_true", help="skip timing the attention call alone")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    print("settings:", " ".join(sys.argv[1:]) or "(defaults)")
    import train_cpu  # bench/ is this script's directory, first on sys.path: its run_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        trainees: dict[str, Trainee] = {}
        for name, (override, positions) in VARIANTS.items():
            spec = train_cpu.run_spec([override, *args.set], Path(tmp) / name)
            dm = spec.experiment.build_datamodule(spec)
            dm.prepare()  # the same cache entry for every variant
            trainees[name] = trainee(spec, dm, positions)
            if name == "mask":
                mask_spec, first = spec, next(iter(dm.train_dataloader()))
        bf16 = mask_spec.precision == "bf16-mixed"
        documents = (first["segments"].amax(dim=1) + 1).float().mean()
        print(
            f"model={mask_spec.cfg.model.dim}x{mask_spec.cfg.model.n_layers}, precision {mask_spec.precision}, "
            f"data.seq_len={mask_spec.cfg.data.seq_len}, data.batch_size={mask_spec.cfg.data.batch_size}, "
            f"{torch.get_num_threads()} threads, clock {args.clock}, torch {torch.__version__}; "
            f"documents (or parts of one) per window: {documents:.1f} (first batch)"
        )

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        for i in range(args.warmup + args.steps):
            for t in list(trainees.values())[:: -1 if i % 2 else 1]:
                step(t, autocast, clock)
        if not args.no_attention:
            attention_times(mask_spec, first, repeats=10, clock=clock)

    measured = slice(args.warmup, None)
    off = trainees["off"].step_seconds[measured]
    print(f"\n{'variant':<11} | {'tokens/s':>8} | {'ratio to off (quartiles)':>24} | {'data ms':>7} | {'loss@end':>8}")
    for name, t in trainees.items():
        seconds = t.step_seconds[measured]
        ratios = [o / s for s, o in zip(seconds, off)]  # paired by step: the same moment of the machine's load
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(
            f"{name:<11} | {t.tokens_per_step / statistics.median(seconds):>8.0f} | "
            f"{q2:>13.3f}x ({q1:.2f}-{q3:.2f}) | {1e3 * statistics.median(t.data_seconds[measured]):>7.2f} | "
            f"{statistics.mean(t.losses[-10:]):>8.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
