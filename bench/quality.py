"""Model quality for a fixed training time: bits per byte on a held-out novel, one recipe after another.

    python bench/quality.py [--budget 180] [--variants today default muon ...] [--sweep] [--set KEY=VALUE ...]
                            [--out quality.json] [--list]

Every variant trains `python train.py` (a child process, as a user runs it) on five of the six Austen novels of
the embedded corpus and is evaluated on the whole of the sixth, *Sense and Sensibility*, held out
(``data.val_paths``), in bits per byte (``val/bpb``: independent of the tokenizer). Each variant trains for the
same wall time (``--budget`` seconds, data preparation, start-up and evaluation not counted): a short calibration
run of the variant measures its seconds per step, and the real run gets ``budget / seconds per step`` steps, so
that its schedule (warm-up, decay) ends when the time does. The variants run one after another in one invocation;
the table gives each one's steps, tokens, training seconds measured in the run, and bpb.

- ``today``: the recipe of 2026-12-01 (AdamW + cosine on ``model=tiny``, batch 16 x 256), spelled out, so that it
  stays comparable when the defaults change;
- ``default``: ``python train.py`` as it is now, with no overrides;
- one variant per option of the recipe (``muon``, ``wsd``, ``z_loss``, ``qk_norm``, ``document_mask``) on top of
  ``today``, and their combination (``combined``);
- ``--sweep``: shapes, batch sizes and learning rates around the combination, for the budget (on 2 CPU cores the
  best shape is smaller and shallower than on a GPU, where the same time buys far more tokens).

The corpus is prepared once (the first variant) into a cache shared by all of them; ``--threads`` sets
OMP_NUM_THREADS of the children. The machine should be otherwise idle: a busy spell shortens the run it falls in.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "datamodules" / "corpora" / "janeausten.jsonl.gz"
HELD_OUT = "sensesensibility"

# 2026-12-01's default run, spelled out: every key this benchmark's variants change
TODAY = [
    "model=tiny",
    "model.dim=256",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_dim=768",
    "model.qk_norm=false",
    "optim=adamw",
    "optim.lr=3e-3",
    "optim.weight_decay=0.1",
    "optim.z_loss=0.0",
    "sched=cosine",
    "sched.warmup_steps=50",
    "sched.min_lr=3e-4",
    "data.batch_size=16",
    "data.seq_len=256",
    "data.vocab_size=4096",
    "data.document_mask=false",
    "trainer.accumulate_grad_batches=1",
    "trainer.gradient_clip_val=1.0",
]
MUON = ["optim=muon", "optim.lr=0.02", "optim.adamw_lr=3e-3", "optim.weight_decay=0.0"]
OPTIONS: dict[str, list[str]] = {
    "muon": MUON,
    "wsd": ["sched=wsd", "sched.warmup_steps=50", "sched.min_lr=3e-4", "sched.decay_fraction=0.3"],
    "z_loss": ["optim.z_loss=1e-4"],
    "qk_norm": ["model.qk_norm=true"],
    "document_mask": ["data.document_mask=true"],
}
VARIANTS: dict[str, list[str] | None] = {
    "today": TODAY,
    "default": None,  # no overrides at all: what `python train.py` does now
    **{name: [*TODAY, *extra] for name, extra in OPTIONS.items()},
    "combined": [*TODAY, *(o for extra in OPTIONS.values() for o in extra)],
}
# around the combination: width x depth, batch, learning rates
SWEEP: dict[str, list[str]] = {
    "combined:dim192x4": ["model.dim=192", "model.n_heads=6", "model.n_kv_heads=3", "model.ffn_dim=576"],
    "combined:dim256x2": ["model.n_layers=2"],
    "combined:dim320x3": [
        "model.dim=320",
        "model.n_layers=3",
        "model.n_heads=10",
        "model.n_kv_heads=5",
        "model.ffn_dim=960",
    ],  # fmt: skip
    "combined:batch8": ["data.batch_size=8"],
    "combined:lr0.04": ["optim.lr=0.04", "optim.adamw_lr=6e-3"],
    "combined:lr0.01": ["optim.lr=0.01", "optim.adamw_lr=2e-3"],
}


class TrainClock(L.Callback):
    """Writes ``clock.json`` into the run directory at the end of training: the optimizer steps, the tokens
    trained on (all ranks), the seconds of training (from the start to the last step, validation excluded) and
    the seconds of each optimizer step."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.tokens = 0
        self.val_seconds = 0.0
        self._val_start = 0.0
        self.start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += batch["input_ids"].numel() * trainer.world_size
        if trainer.global_step > len(self.step_ends):  # an optimizer step ended (not a micro-batch of one)
            self.step_ends.append(time.perf_counter() - self.val_seconds)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.start:  # train.py validates once before fit: not inside the training time
            self.val_seconds += time.perf_counter() - self._val_start

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            ends = self.step_ends
            record = {
                "steps": trainer.global_step,
                "tokens": self.tokens,
                "train_seconds": (ends[-1] - self.start) if ends else 0.0,  # validation subtracted already
                "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
                "step_ends": [e - self.start for e in ends],  # training seconds at the end of each step
            }
            (Path(trainer.default_root_dir) / "clock.json").write_text(json.dumps(record))


def write_data(where: Path) -> tuple[Path, Path]:
    """The five training novels as JSON Lines, the held-out one as plain text."""
    train, held_out = where / "five_novels.jsonl", where / f"{HELD_OUT}.txt"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as src, train.open("w", encoding="utf-8") as out:
        for line in src:
            record = json.loads(line)
            if record["title"] == HELD_OUT:
                held_out.write_text(record["text"], encoding="utf-8")
            else:
                out.write(json.dumps({"text": record["text"]}) + "\n")
    if not held_out.is_file():
        raise SystemExit(f"error: {CORPUS} has no {HELD_OUT}")
    return train, held_out


def train_run(run_dir: Path, overrides: list[str], threads: int | None, root: Path = ROOT) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "train.py",
        *overrides,
        f"hydra.run.dir={run_dir}",
        "+callbacks.clock._target_=bench.quality.TrainClock",
    ]
    env["PYTHONPATH"] = str(root)  # its own packages first: a baseline checkout runs its own code
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "clock.json").read_text())


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def final_scalar(run_dir: Path, tag: str) -> float | None:
    series = scalar_series(run_dir, tag)
    return series[-1][1] if series else None


def run_variant(name: str, overrides: list[str], args, data: list[str], tmp: Path, root: Path = ROOT) -> dict[str, Any]:
    # calibration: a few steps of the variant, nothing validated, for its seconds per step
    quiet = ["callbacks.samples=null", "callbacks.progress_bar=null"]
    probe = [*overrides, *data, *quiet, f"trainer.max_steps={args.calibration_steps}", "trainer.limit_val_batches=0"]
    clock = train_run(tmp / f"{name}-calibration", probe, args.threads, root)
    warm = clock["step_seconds"][len(clock["step_seconds"]) // 3 :] or clock["step_seconds"]  # past the warm-up
    per_step = sorted(warm)[len(warm) // 2]  # the median: a busy moment does not set the number of steps
    steps = max(10, int(args.budget / per_step))
    if args.val_every:  # a whole number of intervals: Lightning validates only at their ends, so the last step too
        steps = max(args.val_every, round(steps / args.val_every) * args.val_every)
    every = args.val_every or steps
    real = [*overrides, *data, *quiet, f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}",
            f"trainer.limit_val_batches={args.val_batches if args.val_batches else 'null'}"]  # fmt: skip
    run_dir = tmp / name
    clock = train_run(run_dir, real, args.threads, root)
    curve = [
        (int(step), clock["step_ends"][int(step) - 1], bpb)
        for step, bpb in scalar_series(run_dir, "val/bpb")
        if 0 < step <= len(clock["step_ends"])
    ]
    return {
        "variant": name,
        "steps": clock["steps"],
        "tokens": clock["tokens"],
        "train_seconds": clock["train_seconds"],
        "seconds_per_step": clock["train_seconds"] / max(1, clock["steps"]),
        "bpb": final_scalar(run_dir, "val/bpb"),
        "val_loss": final_scalar(run_dir, "val/loss"),
        "curve": curve,  # (step, training seconds, bpb) at each validation
        "overrides": overrides,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of training per variant")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from --list")
    parser.add_argument("--sweep", action="store_true", help="also the shapes, batches and rates of SWEEP")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument(
        "--val-batches",
        type=int,
        default=None,
        help="evaluate only this many batches of the held-out novel (default: all of it)",
    )
    parser.add_argument("--val-every", type=int, default=None, help="also validate every this many steps (a curve)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="also run `today` with that checkout's train.py (a git worktree of an older commit), as `baseline`",
    )
    parser.add_argument(
        "--custom",
        nargs="*",
        default=[],
        metavar="NAME=BASE:KEY=VALUE,...",
        help="extra variants: a catalogue variant with more overrides",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--list", action="store_true", help="print the variants and their overrides")
    args = parser.parse_args(argv)
    combined = VARIANTS["combined"] or []
    catalogue = {**VARIANTS, **{name: [*combined, *extra] for name, extra in SWEEP.items()}}
    for spec in args.custom:
        name, _, rest = spec.partition("=")
        base, _, extra = rest.partition(":")
        if not name or base not in catalogue:
            raise SystemExit(f"error: --custom {spec!r}: expected NAME=BASE:KEY=VALUE,... with BASE from --list")
        catalogue[name] = [*(catalogue[base] or []), *(o for o in extra.split(",") if o)]
    if args.list:
        for name, overrides in catalogue.items():
            print(f"{name}: {' '.join(overrides) if overrides is not None else '(no overrides)'}")
        return 0
    names = [*args.variants, *(SWEEP if args.sweep else []), *(c.partition("=")[0] for c in args.custom)]
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}: see --list")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        train, held_out = write_data(tmp)
        data = [f"data.paths=[{train}]", f"data.val_paths=[{held_out}]", f"data.cache_dir={tmp / 'cache'}", *args.set]
        print(f"budget {args.budget:.0f} s of training per variant; train: five Austen novels; held out, evaluated"
              f" whole: {HELD_OUT}; threads {args.threads or 'default'}; extra overrides: {args.set}", flush=True)  # fmt: skip
        # the corpus prepared once, before anything is timed: a first calibration that prepared it ran slow
        quiet = ["callbacks.samples=null", "callbacks.progress_bar=null", "trainer.limit_val_batches=0"]
        train_run(tmp / "prepare", [*data, *quiet, "trainer.max_steps=2"], args.threads)
        if args.baseline is not None:
            names = ["baseline", *names]
        for name in names:
            if name == "baseline":
                row = run_variant(name, TODAY, args, data, tmp, root=args.baseline.resolve())
            else:
                row = run_variant(name, list(catalogue[name] or []), args, data, tmp)
            rows.append(row)
            print(f"  {name}: {row['steps']} steps, {row['train_seconds']:.0f} s, bpb {row['bpb']:.4f}", flush=True)
    base = next((r["bpb"] for r in rows if r["variant"] == ("baseline" if args.baseline else "today")), None)
    print(f"\n{'variant':<22} | {'steps':>5} | {'tokens':>9} | {'train s':>7} | {'s/step':>6} | {'bpb':>6} | vs base")
    for r in rows:
        delta = f"{r['bpb'] - base:+.3f}" if base is not None else ""
        print(f"{r['variant']:<22} | {r['steps']:>5} | {r['tokens']:>9} | {r['train_seconds']:>7.0f} |"
              f" {r['seconds_per_step']:>6.3f} | {r['bpb']:>6.3f} | {delta}")  # fmt: skip
    for r in rows:
        if len(r["curve"]) > 1:
            points = ", ".join(f"{step}: {sec:.0f} s {bpb:.3f}" for step, sec, bpb in r["curve"])
            print(f"  {r['variant']} (step: training s, bpb): {points}")
    if args.out:
        args.out.write_text(json.dumps({"budget": args.budget, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
