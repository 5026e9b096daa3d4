"""Training speed on the CPU: our Lightning stack against a bare PyTorch loop, same model, batches and optimizer.

    python bench/train_cpu.py [--variants torch bare default] [--steps 20 --warmup 3 --rounds 3]
                              [--threads 1 --clock cpu] [--set KEY=VALUE ...] [--syncs] [--profile VARIANT]

The model, data, optimizer, schedule, precision and gradient clipping are those `python train.py` composes from
conf/ (model=tiny, data=corpus: the embedded corpus, its vocabulary from the tokenizer), with `--set` overrides
for every variant, resolved once as train.py resolves them (``resolve`` in llm/app/spec.py: the precision, ``auto``
made concrete, and the gradient accumulation), the DataModule and the module built by the run's experiment.
Validation is off (`trainer.limit_val_batches=0`): it is not part of a training step. Variants:

- ``torch``: a hand-written loop: the DataModule's dataset and sampler in a plain DataLoader, our Transformer, the
  same loss, autocast when the precision is bf16-mixed, backward, clip_grad_norm_, AdamW and the schedule;
- ``bare``: ``lightning.Trainer`` with our CausalLM and PretrainDataModule, no callbacks, logger, checkpointing,
  progress bar or model summary;
- ``default``: the Trainer train.py builds: conf/callbacks/default.yaml, the TensorBoard logger, AtomicCheckpointIO.

A variant may carry its own overrides, ``NAME:KEY=VALUE,KEY=VALUE`` (``torch:trainer.precision=32-true``,
``bare:optim.fused=true``), so fast paths are measured against each other in one run; ``threads=N`` among them
sets ``torch.set_num_threads`` for that variant (``torch:threads=1 torch:threads=2``).

Each round runs every variant once (the order reversed on odd rounds), each from the same initial weights
(seeded just before the model is built) over the same batches, for ``warmup + steps + 1`` optimizer steps; the time
of the ``steps`` steps after the warm-up is measured between consecutive batch ends, so it holds everything the
loop does per step (data, forward, backward, clipping, optimizer, schedule, hooks, logging) and none of the
one-off costs (start-up, the final checkpoint). Prints, per variant: tokens/s (median over rounds); the ratio to
the first variant (median of the per-round ratios, as the variants of a round share the machine's load; lowest and
highest in brackets); the share of step time spent waiting for the next batch (Lightning: from a batch's end to
the next batch's start, an upper bound that also holds the loop's bookkeeping); the time of the warm-up steps
(compilation, with model.compile); the mean loss of the last 10 steps; the largest difference of a step's loss
from the first variant's (equal inputs give equal losses: 0 when only the framework differs).

On a shared, busy machine ``--threads 1 --clock cpu`` times the process's own CPU time (all its threads) instead
of the wall clock. ``--loss-every K`` prints the mean loss of every K steps of each variant (the loss parity of
``trainer.precision=bf16-mixed`` with ``32-true``, for example). ``--syncs`` counts the host-device
synchronisations per training step of each Lightning variant (``aten::_local_scalar_dense``: what ``.item()``,
``bool(tensor)`` and ``float(tensor)`` run), with the code they come from. ``--profile VARIANT`` prints the ops and
the Python functions taking the time of one round of that variant.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import os
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from datamodules.dataset import WindowSampler
from llm.app import schema
from llm.app.builders import build, build_all, build_optimizer
from llm.app.spec import RunSpec, memory_plan, resolve
from llm.core.model import Transformer
from llm.errors import LLMError
from llm.training import parallelize
from llm.training.checkpoint_io import AtomicCheckpointIO
from llm.training.module import IGNORE_INDEX
from llm.training.optim import fused_default, param_groups, splits_matrices

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("torch", "bare", "default")
# the benchmark's own settings, before --set: a CPU run, no validation (it is not part of a step)
BASE = ["trainer.accelerator=cpu", "trainer.limit_val_batches=0"]


# --------------------------------------------------------------------------------------------------- configuration


@dataclass
class Variant:
    name: str  # as given on the command line
    kind: str  # torch | bare | default
    spec: RunSpec
    threads: int | None = None  # torch.set_num_threads while this variant runs (None: --threads)


def parse_variant(spec: str) -> tuple[str, list[str], int | None]:
    """KIND[:KEY=VALUE,...] -> (kind, config overrides, threads); `threads=N` is the benchmark's own key."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"error: variant {spec!r}: the kind must be one of {', '.join(KINDS)}")
    overrides, threads = [], None
    for item in (o for o in rest.split(",") if o):
        if item.startswith("threads="):
            threads = int(item.removeprefix("threads="))
        else:
            overrides.append(item)
    return kind, overrides, threads


def quoted(value: str | Path) -> str:
    """A Hydra override value that stays one string whatever it holds (a path with spaces, `=`, `,` ...)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_spec(overrides: Sequence[str], run_dir: str | Path, base: Sequence[str] = BASE) -> RunSpec:
    """The run train.py composes and resolves (llm/app/spec.py) for ``base`` + ``overrides``, in run_dir; a relative
    ``data.cache_dir`` is taken from the repository root, as `python train.py` run there takes it, from any cwd."""
    given = [*base, *overrides, f"run_dir={quoted(run_dir)}"]
    cfg = schema.compose(given)
    cache_dir = cfg.data.get("cache_dir")
    if cache_dir is not None and not Path(str(cache_dir)).expanduser().is_absolute():
        given.append(f"data.cache_dir={quoted(ROOT / str(cache_dir))}")
        cfg = schema.compose(given)
    return resolve(cfg, overrides=given)


def build_variants(specs: list[str], common: list[str], run_dir: Path) -> list[Variant]:
    variants = []
    for spec in specs:
        kind, own, threads = parse_variant(spec)
        variants.append(Variant(spec, kind, run_spec([*common, *own], run_dir / str(len(variants))), threads))
    return variants


def datamodule_of(spec: RunSpec, cache: dict[str, Any]) -> L.LightningDataModule:
    """One prepared DataModule per data config (variants with the same data share it), built as train.py does."""
    key = str(spec.cfg.data)
    if key not in cache:
        dm = spec.experiment.build_datamodule(spec)
        dm.prepare()
        cache[key] = dm
    return cache[key]


# --------------------------------------------------------------------------------------------------- measurement


@dataclass
class Round:
    """One run of a variant: the clock at each batch start and end, and the loss of each batch."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    data: list[float] = field(default_factory=list)  # torch loop only: time in next(loader)
    losses: list[torch.Tensor] = field(default_factory=list)
    tokens_per_batch: int = 0

    def window(self, warmup: int, steps: int) -> tuple[float, float]:
        """(seconds, seconds waiting for data) of the batches warmup .. warmup+steps-1, end to end."""
        seconds = self.ends[warmup + steps - 1] - self.ends[warmup - 1]
        if self.data:
            wait = sum(self.data[warmup : warmup + steps])
        else:  # Lightning: from the previous batch's end to this batch's start
            wait = sum(self.starts[i] - self.ends[i - 1] for i in range(warmup, warmup + steps))
        return seconds, wait


class StepClock(L.Callback):
    """Records the clock at each batch start and end, and the batch's loss (kept as a tensor: no sync)."""

    def __init__(self, clock: Callable[[], float], record: Round) -> None:
        self.clock, self.record = clock, record

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.record.starts.append(self.clock())
        self.record.tokens_per_batch = batch["input_ids"].numel()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, idx: int) -> None:
        self.record.ends.append(self.clock())
        self.record.losses.append(outputs["loss"].detach())


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.steps + 1  # +1: the last step's one-off work (LastCheckpoint saves) is outside


def train_torch(
    spec: RunSpec,
    dm: L.LightningDataModule,
    steps: int,
    clock: Callable[[], float],
    max_steps: int | None = None,
) -> Round:
    """The bare loop: the same model, batches, loss, precision, clipping, optimizer and schedule as the Trainer's.

    ``max_steps``: the schedule's length (None: the config's ``trainer.max_steps``)."""
    record = Round()
    cfg = spec.cfg
    precision = spec.precision
    if precision not in ("32-true", "32", "bf16-mixed"):
        raise SystemExit(f"error: the torch variant runs 32-true and bf16-mixed, not trainer.precision={precision}")
    accumulate = spec.accumulation
    clip = cfg.trainer.get("gradient_clip_val")
    L.seed_everything(spec.seed, workers=True, verbose=False)
    model_cfg = spec.experiment.model_config(spec, dm)
    model = Transformer(model_cfg)  # drawn from the same seed as CausalLM.configure_model in the Lightning variants
    parallelize.apply(model, model_cfg, None)  # model.compile=true compiles each block, as in training
    model.train()
    optimizer_factory = build_optimizer(cfg.optim)  # as the experiment builds it for the module
    decay = optimizer_factory.keywords.get("weight_decay", 0.0)
    groups = param_groups(model, decay, split_matrices=splits_matrices(optimizer_factory))
    optimizer = optimizer_factory(groups, **fused_default(optimizer_factory, model.parameters()))  # as the module
    schedule_steps = int(cfg.trainer.max_steps) if max_steps is None else max_steps
    scheduler = build(cfg.sched, "sched")(optimizer, max_steps=schedule_steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    sampler = WindowSampler(dm.train_dataset, shuffle=True, seed=dm.seed, rank=0, world_size=1)
    loader = DataLoader(
        dm.train_dataset,
        batch_size=dm.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=dm.num_workers,
        persistent_workers=dm.num_workers > 0,
    )
    batches = iter(loader)
    for i in range(steps * accumulate):
        start = clock()
        batch = next(batches)
        record.data.append(clock() - start)
        record.starts.append(start)
        record.tokens_per_batch = batch["input_ids"].numel()
        with autocast:
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        (loss / accumulate if accumulate > 1 else loss).backward()
        if (i + 1) % accumulate == 0:
            if clip:  # over the optimizer's parameters in its order, as Lightning does (the same float sum)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], float(clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        record.ends.append(clock())
        record.losses.append(loss.detach())
    return record


@contextlib.contextmanager
def quiet() -> Any:
    """Lightning's start-up messages and the progress bar (stdout) off the terminal; the bar still does its work."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(devnull),
            contextlib.redirect_stderr(devnull),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train_lightning(
    spec: RunSpec,
    dm: L.LightningDataModule,
    kind: str,
    steps: int,
    clock: Callable[[], float],
    first: list[L.Callback] | None = None,
) -> Round:
    """CausalLM + PretrainDataModule through lightning.Trainer, bare or with train.py's callbacks and loggers.

    ``first``: callbacks to run before the others (the timer runs after them all)."""
    record = Round()
    timer = StepClock(clock, record)
    first = list(first or [])
    cfg = spec.cfg
    if kind == "bare":
        extra = dict(
            callbacks=[*first, timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    else:  # as train.py builds it
        hparams = {"planned_memory_gb": planned_memory_gb(spec, dm)}
        extra = dict(
            callbacks=[*first, *build_all(cfg.callbacks, hparams=hparams), timer], logger=build_all(cfg.logger)
        )
        extra["plugins"] = [AtomicCheckpointIO()]
    with quiet():
        trainer: L.Trainer = build(
            cfg.trainer, "trainer", **spec.trainer_arguments(), max_steps=steps * spec.accumulation, **extra
        )
        L.seed_everything(spec.seed, workers=True, verbose=False)
        module = spec.experiment.build_module(spec, dm)
        module.configure_model()  # the weights drawn now, from the seed, as in the torch loop
        trainer.fit(module, datamodule=dm)
    return record


def planned_memory_gb(spec: RunSpec, dm: L.LightningDataModule) -> float | None:
    """What train.py gives the HParams callback: the planner's peak per device (GiB) with the tokenizer's
    vocabulary; None when the planner cannot tell."""
    try:
        total = float(memory_plan(spec, vocab_size=dm.vocab_size).total)
    except LLMError:
        return None
    return total / 2**30 if math.isfinite(total) else None


def run(variant: Variant, dm: L.LightningDataModule, steps: int, clock: Callable[[], float]) -> Round:
    threads = torch.get_num_threads()
    if variant.threads:
        torch.set_num_threads(variant.threads)
    try:
        if variant.kind == "torch":
            return train_torch(variant.spec, dm, steps, clock, max_steps=steps)
        return train_lightning(variant.spec, dm, variant.kind, steps, clock)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- reports


def count_syncs(variant: Variant, dm: L.LightningDataModule, args: argparse.Namespace) -> None:
    """Host-device synchronisations per step: the `aten::_local_scalar_dense` calls (`.item()`, `bool(t)`,
    `float(t)`) during the measured steps, grouped by the code that made them."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    calls: dict[str, int] = {}

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                stack = traceback.extract_stack()[:-1]
                # AdamW's step counters are host tensors on every device (unless capturable): no device sync
                host = any("/torch/optim/" in f.filename for f in stack[-4:])
                skip = ("/torch/", "bench/", "lightning_utilities/")  # generic helpers: show who called them
                frames = [f for f in stack if not any(s in f.filename for s in skip)][-3:]
                text = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
                calls[("host: " if host else "") + text] = calls.get(("host: " if host else "") + text, 0) + 1
            return func(*args_, **(kwargs or {}))

    class Window(L.Callback):
        """The mode on from the first measured batch's start to the next batch's start after the last measured one:
        whole steps, with what the loop does after the batch-end hooks (its own logging)."""

        mode: Syncs | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            if idx == args.warmup + args.steps and self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.mode = None
            if idx == args.warmup:
                self.mode = Syncs()
                self.mode.__enter__()

    train_lightning(variant.spec, dm, variant.kind, total_steps(args), time.perf_counter, first=[Window()])
    device = sum(n for where, n in calls.items() if not where.startswith("host: "))
    print(
        f"\n{variant.name}: {device} tensor-to-Python reads that are host-device syncs on a GPU in {args.steps} steps "
        f"({device / args.steps:.2f} per step; "
        f"trainer.log_every_n_steps={variant.spec.cfg.trainer.log_every_n_steps}), "
        "innermost code first:"
    )
    for where, n in sorted(calls.items(), key=lambda kv: (kv[0].startswith("host: "), -kv[1])):
        print(f"  {n:>5}  {n / args.steps:>5.2f}/step  {where}")


def profile(variant: Variant, dm: L.LightningDataModule, args: argparse.Namespace) -> None:
    """One round of the variant under cProfile (Python functions) and torch.profiler (ops)."""
    steps = total_steps(args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiler = cProfile.Profile()
        profiler.enable()
        run(variant, dm, steps, time.perf_counter)
        profiler.disable()
    print(f"\n{variant.name}: the ops taking the time of {steps} steps (torch.profiler, self time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
    print(f"{variant.name}: Python functions by cumulative time (cProfile)")
    print(out.getvalue())


def report(variants: list[Variant], rounds: dict[str, list[Round]], args: argparse.Namespace) -> None:
    """The table: tokens/s, seconds per step, ratio to the first variant, data wait, losses."""
    width = max(len(v.name) for v in variants)
    print(
        f"{'variant':<{width}} | {'tokens/s':>8} | {'s/step':>6} | {'ratio (min-max)':>16} | {'data wait':>9} | "
        f"{'warm-up s':>9} | {'loss@end':>8} | {'max|dloss|':>10}"
    )

    def speed(r: Round) -> float:
        return args.steps * r.tokens_per_batch / r.window(args.warmup, args.steps)[0]

    reference = rounds[variants[0].name]
    ref_losses = torch.stack(reference[0].losses).float()
    for v in variants:
        rs = rounds[v.name]
        seconds = [r.window(args.warmup, args.steps) for r in rs]
        ratios = [speed(r) / speed(ref) for r, ref in zip(rs, reference)]  # paired: the same round, the same load
        losses = torch.stack(rs[0].losses).float()
        n = min(len(losses), len(ref_losses))
        print(
            f"{v.name:<{width}} | {median([speed(r) for r in rs]):>8.0f} | "
            f"{median([s for s, _ in seconds]) / args.steps:>6.3f} | "
            f"{median(ratios):>5.3f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{100 * median([w / s for s, w in seconds]):>8.2f}% | "
            f"{median([r.ends[args.warmup - 1] - r.starts[0] for r in rs]):>9.1f} | "
            f"{losses[-min(10, n) :].mean().item():>8.4f} | "
            f"{(losses[:n] - ref_losses[:n]).abs().max().item():>10.2e}"
        )


def loss_curves(variants: list[Variant], rounds: dict[str, list[Round]], every: int) -> None:
    """Mean loss of each block of `every` steps (first round), one line per variant: curves to compare."""
    n = min(len(rounds[v.name][0].losses) for v in variants)
    blocks = [(i, min(i + every, n)) for i in range(0, n, every)]
    width = max(len(v.name) for v in variants)
    print(f"\nmean loss of steps {', '.join(f'{a}-{b - 1}' for a, b in blocks)}:")
    for v in variants:
        losses = torch.stack(rounds[v.name][0].losses).float()
        print(f"{v.name:<{width}} | " + " ".join(f"{losses[a:b].mean().item():7.4f}" for a, b in blocks))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["torch", "bare", "default"], help="KIND[:KEY=VALUE,...]")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measured ones")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    parser.add_argument("--loss-every", type=int, default=0, help="print mean losses per block of this many steps")
    parser.add_argument("--syncs", action="store_true", help="count host-device syncs per step (Lightning variants)")
    parser.add_argument("--profile", metavar="VARIANT", default=None, help="profile one round of this variant")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args.variants, args.set, Path(tmp))
        data: dict[str, Any] = {}
        for v in variants:
            datamodule_of(v.spec, data)
        ref = variants[0].spec
        print(
            f"first variant: model={ref.model.dim}x{ref.model.n_layers} (vocab {datamodule_of(ref, data).vocab_size}), "
            f"batch {ref.cfg.data.batch_size} x seq {ref.cfg.data.seq_len}, precision {ref.precision}, "
            f"optim fused={ref.cfg.optim.get('fused')}, compile={ref.model.compile}; {args.warmup} warm-up + "
            f"{args.steps} measured steps, {args.rounds} rounds; CPU, {torch.get_num_threads()} threads, "
            f"{args.clock} clock; torch {torch.__version__}, lightning {L.__version__}"
        )
        if args.profile is not None:
            chosen = [v for v in variants if v.name == args.profile]
            if not chosen:
                parser.error(f"--profile {args.profile}: not one of --variants {args.variants}")
            profile(chosen[0], datamodule_of(chosen[0].spec, data), args)
            return 0
        if args.syncs:
            for v in variants:
                if v.kind != "torch":
                    count_syncs(v, datamodule_of(v.spec, data), args)
            return 0

        rounds: dict[str, list[Round]] = {v.name: [] for v in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                rounds[v.name].append(run(v, datamodule_of(v.spec, data), total_steps(args), clock))

    report(variants, rounds, args)
    if args.loss_every:
        loss_curves(variants, rounds, args.loss_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
