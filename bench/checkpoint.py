"""How long a checkpoint save blocks the training loop, synchronous against asynchronous (`checkpoint.async_save`).

    python bench/checkpoint.py [--set KEY=VALUE ...] [--steps 12 --every 3] [--dir DIR]

Trains the model train.py composes (``model=small`` unless ``--set model=...``; the embedded corpus, short windows,
validation off) twice in one process from the same initial weights, once per CheckpointIO that train.py would
use (llm/training/checkpoint_io.py): ``sync`` (AtomicCheckpointIO: serialise, write, fsync, rename, all in the
loop) and ``async`` (AsyncCheckpointIO: the state copied to host memory in the loop, the rest in a thread). Every
``--every`` optimizer steps a full training checkpoint (weights, AdamW moments, schedule, loops) is saved with
``trainer.save_checkpoint``, as LastCheckpoint does, and the call is timed: that is what the loop waits for.
Prints, per variant: the checkpoint's size, the blocked time per save (median and largest), for ``async`` the
time the thread took to write each file, and the median step time, saves left out (on a CPU the
writer thread competes with training for the cores; on a GPU it would not), then the ratio of blocked times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py's packages, when run as `python bench/checkpoint.py`

from bench.train_cpu import quiet  # noqa: E402
from llm.app import schema  # noqa: E402
from llm.app.builders import build  # noqa: E402
from llm.app.spec import resolve  # noqa: E402
from llm.training.checkpoint_io import AsyncCheckpointIO, AtomicCheckpointIO  # noqa: E402

BASE = [
    "model=small",
    "data.seq_len=64",
    "data.batch_size=2",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=auto",
    "plan.check=false",
]


class TimedAsync(AsyncCheckpointIO):
    """AsyncCheckpointIO that also records how long the thread took for each write."""

    def __init__(self) -> None:
        super().__init__()
        self.write_s: list[float] = []

    def _submit(self, fn: Any, *args: Any) -> None:
        def timed(*inner: Any) -> None:
            start = time.perf_counter()
            fn(*inner)
            if fn is AtomicCheckpointIO.save_checkpoint:
                self.write_s.append(time.perf_counter() - start)

        super()._submit(timed, *args)


class SaveEvery(L.Callback):
    """Saves a full checkpoint every ``every`` optimizer steps and times the call; times the other steps too."""

    def __init__(self, every: int, path: Path) -> None:
        self.every, self.path = every, path
        self.blocked_s: list[float] = []
        self.step_s: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._last is not None:  # from the end of the previous step's hooks (its save included) to this one's
            self.step_s.append(time.perf_counter() - self._last)
        if trainer.global_step % self.every == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's own kernels are not the save's
            start = time.perf_counter()
            trainer.save_checkpoint(self.path, weights_only=False)
            self.blocked_s.append(time.perf_counter() - start)
        self._last = time.perf_counter()


def run_variant(name: str, overrides: list[str], steps: int, every: int, out: Path) -> dict[str, Any]:
    cfg = schema.compose([*BASE, *overrides, f"run_dir={out / name}"])
    spec = resolve(cfg)
    with quiet():
        L.seed_everything(spec.seed, workers=True, verbose=False)
        dm = spec.experiment.build_datamodule(spec)
        dm.prepare()
        module = spec.experiment.build_module(spec, dm)
        io = TimedAsync() if name == "async" else AtomicCheckpointIO()
        saver = SaveEvery(every, out / name / "last.ckpt")
        trainer: L.Trainer = build(
            cfg.trainer,
            "trainer",
            **spec.trainer_arguments(),
            max_steps=steps,
            callbacks=[saver],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[io],
        )
        trainer.fit(module, datamodule=dm)  # teardown waits for the last write
    size = (out / name / "last.ckpt").stat().st_size
    params = sum(p.numel() for p in module.parameters())
    return {
        "name": name,
        "params": params,
        "size": size,
        "blocked": saver.blocked_s,
        "write": getattr(io, "write_s", []),
        "step": saver.step_s,
        "device": str(trainer.strategy.root_device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (both variants)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="save every N optimizer steps")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [run_variant(name, args.set, args.steps, args.every, Path(tmp)) for name in ("sync", "async")]
    first = results[0]
    print(
        f"model: {first['params'] / 1e6:.1f}M parameters on {first['device']}; checkpoint {first['size'] / 2**20:.0f}"
        f" MiB (weights, AdamW moments, schedule, loops); a save every {args.every} steps, {args.steps} steps"
    )
    print(f"{'variant':8} {'saves':>5} {'blocked/save median':>20} {'max':>8} {'thread write':>13} {'step':>15}")
    for r in results:
        write = f"{statistics.median(r['write']):.3f} s" if r["write"] else "-"
        step = f"{statistics.median(r['step']):.3f} s" if r["step"] else "-"
        print(
            f"{r['name']:8} {len(r['blocked']):>5} {statistics.median(r['blocked']):>18.3f} s {max(r['blocked']):>6.3f} s"
            f" {write:>13} {step:>15}"
        )
    sync, asynchronous = (statistics.median(r["blocked"]) for r in results)
    print(f"async blocks the loop {sync / asynchronous:.1f}x less per save ({sync:.3f} s -> {asynchronous:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
