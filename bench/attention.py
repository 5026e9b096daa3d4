"""What the attention maps (callbacks/attention.py) and the embedding projector (callbacks/embeddings.py) cost a
default run, on the CPU.

    python bench/attention.py [--steps 20 --warmup 2 --calls 10] [--threads N --clock wall] [--set KEY=VALUE ...]

The run is the default pretraining's (model=tiny, data=corpus, its batch and sequence length, the precision
train.py resolves), composed and resolved as train.py does (bench/train_cpu.py's ``run_spec``), its model and
optimizer built as bench/document_mask.py builds them. Taking turns, so that a busy spell of a shared machine
slows both alike: ``--calls`` rounds of a few training steps (``--steps`` over all rounds, each timed alone) and one
call of the attention callback's ``on_validation_end`` as a validation makes it (the forward on the first sample
prompt, an image per layer, written to a TensorBoard event file by a real TensorBoardLogger). Printed:

- the callback's time per validation (median, quartiles) against the time between two validations of the default
  run, ``trainer.val_check_interval`` training steps at the median step time (the validation's own time left out:
  the ratio is an upper bound), per round paired with that round's steps;
- its one-off cost (importing matplotlib, drawing the figure's labels), and with it the share of the whole default
  run (``trainer.max_steps`` steps, a validation at step 0 and every interval);
- the embedding projector's one write at the end of training (``top_k`` rows gathered, written as TSV), against
  the run's training time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.attention import AttentionMaps
from callbacks.embeddings import EmbeddingProjector
from llm.app.builders import build_all


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    return tuple(statistics.quantiles(xs, n=4)) if len(xs) > 1 else (xs[0],) * 3  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured training steps, over all rounds")
    parser.add_argument("--warmup", type=int, default=2, help="training steps and callback calls not measured")
    parser.add_argument("--calls", type=int, default=10, help="rounds: measured calls of the callback")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU time")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the default run")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.calls < 1 or args.warmup < 1:
        parser.error("--steps, --calls and --warmup must be >= 1")
    print("settings:", " ".join(sys.argv[1:]) or "(defaults)")
    import document_mask  # bench/ is this script's directory, first on sys.path
    import train_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        spec = train_cpu.run_spec(args.set, Path(tmp) / "run", base=["trainer.accelerator=cpu"])
        dm = spec.experiment.build_datamodule(spec)
        dm.prepare()
        t = document_mask.trainee(spec, dm, positions=False)
        bf16 = spec.precision == "bf16-mixed"

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        # the callbacks as the default config builds them (their prompt: the samples callback's first)
        built = build_all({name: spec.cfg.callbacks[name] for name in ("attention", "embeddings")})
        attention = next(cb for cb in built if isinstance(cb, AttentionMaps))
        projector = next(cb for cb in built if isinstance(cb, EmbeddingProjector))
        logger = TensorBoardLogger(tmp, name="tensorboard", version="")
        trainer = SimpleNamespace(sanity_checking=False, datamodule=dm, global_step=0, is_global_zero=True)
        trainer.loggers = [logger]

        def validation_end(step: int) -> float:
            trainer.global_step = step
            start = clock()
            attention.on_validation_end(trainer, t.module)
            return clock() - start

        first_call = validation_end(0)  # imports matplotlib, draws the figure's background once
        per_round = max(1, args.steps // args.calls)
        for _ in range(args.warmup):
            document_mask.step(t, autocast, clock)
            validation_end(1)
        t.step_seconds.clear()
        rounds: list[tuple[float, float]] = []  # (callback seconds, median step seconds of the round)
        for r in range(args.calls):
            n = len(t.step_seconds)
            for _ in range(per_round):
                document_mask.step(t, autocast, clock)
            call = validation_end(2 + r)
            rounds.append((call, statistics.median(t.step_seconds[n:])))
        trainer.global_step = spec.cfg.trainer.max_steps
        start = clock()
        projector.write(trainer, t.module)
        projector_seconds = clock() - start
        logger.experiment.flush()

    interval = int(spec.cfg.trainer.val_check_interval)
    max_steps = int(spec.cfg.trainer.max_steps)
    validations = max_steps // interval + 1  # step 0, then every interval (the last at the end)
    step_s = statistics.median(t.step_seconds)
    calls = [c for c, _ in rounds]
    shares = [c / (interval * s) for c, s in rounds]  # each call against its own round's steps
    q1, q2, q3 = quartiles(shares)
    run_s = max_steps * step_s
    whole = (first_call + (validations - 1) * statistics.median(calls)) / run_s
    layers, heads = spec.model.n_layers, spec.model.n_heads
    print(
        f"model={spec.model.dim}x{layers} ({heads} heads), precision {spec.precision}, data.seq_len="
        f"{spec.cfg.data.seq_len}, data.batch_size={spec.cfg.data.batch_size}, {torch.get_num_threads()} threads, "
        f"clock {args.clock}, torch {torch.__version__}; prompt {attention.prompt!r}"
    )
    print(f"\n{'what':<48} | {'seconds':>8} | share of the run's time")
    print(f"{'training step (median)':<48} | {step_s:>8.3f} |")
    print(f"{f'validation interval ({interval} steps)':<48} | {interval * step_s:>8.2f} |")
    print(
        f"{f'attention maps per validation ({layers} images)':<48} | {statistics.median(calls):>8.4f} | "
        f"{100 * q2:.2f}% of an interval ({100 * q1:.2f}-{100 * q3:.2f}%)"
    )
    print(f"{'attention maps, first call (matplotlib, labels)':<48} | {first_call:>8.3f} |")
    print(
        f"{f'attention maps, whole run ({validations} validations)':<48} | "
        f"{first_call + (validations - 1) * statistics.median(calls):>8.3f} | {100 * whole:.2f}% of {max_steps} steps"
    )
    print(
        f"{f'embedding projector at the end ({projector.top_k} tokens)':<48} | {projector_seconds:>8.3f} | "
        f"{100 * projector_seconds / run_s:.2f}% of {max_steps} steps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
