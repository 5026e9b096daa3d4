"""SFT training speed, packed against padded: tokens/s of real (non-padding) tokens and the padding waste.

    python bench/sft_packing.py [--sets embedded chat] [--steps 20 --warmup 3 --rounds 3] [--threads N --clock wall]
                                [--set KEY=VALUE ...] [--chat-examples 4000 --chat-median 60 --chat-sigma 0.8]

The run is the default finetune's on the CPU: `data=sft` (its seq_len and batch_size), model=tiny, the precision
train.py resolves (``auto``), composed and resolved as train.py does (``run_spec`` of bench/train_cpu.py), with the
tokenizer of the embedded pretraining corpus (what `python train.py` leaves in its checkpoint, and so what
`experiment=finetune init_from=...` uses). Two example sets:

- ``embedded``: the embedded SFT set (datamodules/corpora/austen_sft.jsonl.gz), through the DataModule;
- ``chat``: a short-chat length distribution: ``--chat-examples`` examples whose lengths are log-normal (median
  ``--chat-median`` tokens, ``--chat-sigma``), clipped to [8, seq_len + 1] (the DataModule truncates longer ones),
  random token ids, the last 40-70% of each example trained (the answer); seeded. They replace the DataModule's
  train split, so the same loader, sampler and collate serve them.

Each is trained padded (``data.packing=false``: batches padded to their longest example) and packed
(``data.packing=true``: rows of examples, block-diagonal attention), ``batch_size`` rows per step either way. A round
runs every (set, mode) once, the modes' order reversed on odd rounds, each from the same initial weights for
``warmup + steps`` steps: the CausalLM's forward and loss, backward, clipping and the fused AdamW step, as in
training. Prints per (set, mode): real tokens per step, the padding share of the batches' tokens, real tokens/s
(median over rounds), and the speed-up of packed over padded (median of the per-round ratios, lowest and highest).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.sft import SFTDataModule, SFTExample, sft_dataset
from llm.app.builders import build_optimizer
from llm.app.spec import RunSpec
from llm.training.optim import fused_default, param_groups, splits_matrices

MODES = {"padded": "data.packing=false", "packed": "data.packing=true"}


@dataclass
class Measured:
    seconds: float  # of the measured steps
    real_tokens: int  # non-padding input tokens of the measured steps
    slots: int  # all input tokens of the measured steps (padding included)


def chat_examples(n: int, median: float, sigma: float, seq_len: int, vocab: int, seed: int) -> list[SFTExample]:
    """Synthetic short chats: log-normal lengths, random ids (above the special ones), the answer trained."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 8, seq_len + 1).astype(int)
    examples = []
    for length in lengths:
        ids = rng.integers(3, vocab, length)
        trained = np.zeros(length, dtype=bool)
        trained[int(length * rng.uniform(0.3, 0.6)) :] = True
        examples.append(SFTExample(ids, trained))
    return examples


def batches(dm: SFTDataModule) -> Iterator[dict[str, torch.Tensor]]:
    """The train loader's batches, epoch after epoch (the same seeded order each time it is called)."""
    while True:
        yield from dm.train_dataloader()


def train(spec: RunSpec, dm: SFTDataModule, warmup: int, steps: int, clock: Callable[[], float]) -> Measured:
    """``warmup + steps`` training steps of a CausalLM from the seed; the last ``steps`` are measured."""
    L.seed_everything(spec.seed, verbose=False)
    module = spec.experiment.build_module(spec, dm)
    module.configure_model()
    module.train()
    factory = build_optimizer(spec.cfg.optim)
    groups = param_groups(module, factory.keywords.get("weight_decay", 0.0), split_matrices=splits_matrices(factory))
    optimizer = factory(groups, **fused_default(factory, module.parameters()))
    clip = spec.cfg.trainer.get("gradient_clip_val")
    bf16 = spec.precision == "bf16-mixed"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    real = slots = 0
    source = batches(dm)
    for i in range(warmup + steps):
        if i == warmup:
            start = clock()
        batch = next(source)
        with autocast:
            logits = module(batch["input_ids"], batch.get("positions"), batch.get("segments"))
            loss = module.loss(logits, batch["labels"])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), float(clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            real += int((batch["input_ids"] != dm.pad_id).sum())
            slots += batch["input_ids"].numel()
    return Measured(clock() - start, real, slots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", choices=["embedded", "chat"], default=["embedded", "chat"])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per (set, mode) and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU time")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--chat-examples", type=int, default=4000)
    parser.add_argument("--chat-median", type=float, default=60.0)
    parser.add_argument("--chat-sigma", type=float, default=0.8)
    args = parser.parse_args(argv)
    print("settings:", " ".join(sys.argv[1:]) or "(defaults)")
    import train_cpu  # bench/ is this script's directory, first on sys.path: its run_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        corpus = train_cpu.run_spec(args.set, Path(tmp) / "corpus")  # the pretraining run: its tokenizer
        tokenizer = train_cpu.datamodule_of(corpus, {}).tokenizer_source()
        runs: dict[tuple[str, str], tuple[RunSpec, SFTDataModule]] = {}
        for name in args.sets:
            for mode, override in MODES.items():
                given = ["data=sft", f"data.tokenizer={train_cpu.quoted(tokenizer)}", override, *args.set]
                spec = train_cpu.run_spec(given, Path(tmp) / f"{name}-{mode}")
                dm = spec.experiment.build_datamodule(spec)
                dm.prepare()
                if name == "chat":
                    examples = chat_examples(
                        args.chat_examples, args.chat_median, args.chat_sigma, dm.seq_len, dm.vocab_size, spec.seed
                    )
                    dm.train_dataset = sft_dataset(examples, dm.seq_len, dm.packing)
                runs[name, mode] = spec, dm
        spec = next(iter(runs.values()))[0]
        print(
            f"model={spec.cfg.model.dim}x{spec.cfg.model.n_layers}, precision {spec.precision}, "
            f"data.seq_len={spec.cfg.data.seq_len}, data.batch_size={spec.cfg.data.batch_size} (rows), "
            f"{torch.get_num_threads()} threads, clock {args.clock}"
        )
        for name in args.sets:
            dm = runs[name, "packed"][1]
            lengths = [len(e.ids) - 1 for e in dm.train_dataset.examples]
            print(
                f"{name}: {len(lengths)} examples, input tokens median {int(np.median(lengths))}, "
                f"mean {np.mean(lengths):.0f}, max {max(lengths)}; packed into {len(dm.train_dataset)} rows"
            )
        results: dict[tuple[str, str], list[Measured]] = {key: [] for key in runs}
        for r in range(args.rounds):
            for name in args.sets:
                for mode in list(MODES)[:: -1 if r % 2 else 1]:
                    spec, dm = runs[name, mode]
                    results[name, mode].append(train(spec, dm, args.warmup, args.steps, clock))
    print(
        f"\n{'set':<8} | {'mode':<6} | {'real tokens/step':>16} | {'padding':>7} | {'tokens/s':>8} | "
        f"{'speed-up (min-max)':>18}"
    )
    for name in args.sets:
        padded = results[name, "padded"]
        for mode in MODES:
            ms = results[name, mode]
            speeds = [m.real_tokens / m.seconds for m in ms]
            ratios = [s / (p.real_tokens / p.seconds) for s, p in zip(speeds, padded)]  # paired by round
            waste = 1 - sum(m.real_tokens for m in ms) / sum(m.slots for m in ms)
            print(
                f"{name:<8} | {mode:<6} | {ms[0].real_tokens / args.steps:>16.0f} | {100 * waste:>6.1f}% | "
                f"{statistics.median(speeds):>8.0f} | "
                f"{statistics.median(ratios):>6.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
