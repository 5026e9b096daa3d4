"""Training speed and memory against sequence length and width, next to what the FLOPs count predicts.

    python bench/scaling.py [--models tiny small] [--seq-lens 128 256 512 1024] [--tokens tiny=4096 small=1024]
                            [--steps 3 --warmup 1 --rounds 2] [--threads 1 --clock cpu] [--reference tiny:256]
                            [--set KEY=VALUE ...]

Each point (model, sequence length T) trains with bench/train_cpu.py's bare PyTorch loop (the Trainer adds a few
percent at most: see that script), on the embedded corpus, with the precision, optimizer and clipping of
conf/ (``--set`` for others), a micro-batch of ``tokens / T`` sequences (``--tokens``: per model, so every point
of a model computes on the same number of tokens per step), ``model.max_seq_len`` raised to T where needed.

Every point runs in processes of its own, the points taking turns over ``--rounds`` rounds (the median time is
kept). Its memory is measured in one more process, over 3 steps, where glibc is told to return every freed block of
64 KiB or more to the system (``MALLOC_MMAP_THRESHOLD_``, as tests/llm/test_plan.py does; it would slow the timed
runs), so that peak RSS follows live memory; the peak is counted from just before the model is built (data,
imports and the interpreter excluded) and printed next to the memory planner's estimate of the run as train.py
resolves it (``memory_plan`` in llm/app/spec.py; the estimate is llm/core/memory.py).

Predicted time per token = ``llm.core.flops.flops_per_token(model, T)`` / R, where R is the FLOP/s achieved at the
reference point (``--reference MODEL:T``); measured / predicted is 1 where the 6N + 12 L d T count explains the
time, above 1 where something the count ignores (elementwise work, the loss over the vocabulary, overheads)
weighs more than at the reference point.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_TOKENS = {"tiny": 4096, "small": 1024}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(point: dict) -> dict:
    """One point, in this process: compose and resolve, prepare data, reset the peak, train, report (a JSON-able
    dict)."""
    import torch
    import train_cpu  # bench/ is this script's directory, first on sys.path

    from llm.app.spec import memory_plan
    from llm.core.config import ModelConfig
    from llm.core.flops import flops_per_token

    if point["threads"]:
        torch.set_num_threads(point["threads"])
    clock = time.process_time if point["clock"] == "cpu" else time.perf_counter
    T, batch = point["seq_len"], point["batch"]
    overrides = [f"model={point['model']}", f"data.seq_len={T}", f"data.batch_size={batch}", *point["set"]]
    with tempfile.TemporaryDirectory() as tmp:
        spec = train_cpu.run_spec(overrides, tmp)
        if spec.model.max_seq_len < T:  # positions are computed, not learned: a longer table costs nothing else
            spec = train_cpu.run_spec([*overrides, f"model.max_seq_len={T}"], tmp)
        dm = train_cpu.datamodule_of(spec, {})
        model: ModelConfig = spec.experiment.model_config(spec, dm)
        planned = memory_plan(spec, vocab_size=dm.vocab_size).total
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS (VmHWM) := current RSS
        baseline = _status("VmRSS")
        record = train_cpu.train_torch(spec, dm, point["warmup"] + point["steps"] + 1, clock)
        peak = _status("VmHWM") - baseline
    seconds, wait = record.window(point["warmup"], point["steps"])
    return {
        **point,
        "precision": spec.precision,
        "seconds_per_step": seconds / point["steps"],
        "tokens_per_step": record.tokens_per_batch,
        "flops_per_token": flops_per_token(model, T),
        "peak_bytes": peak,
        "planned_bytes": planned,
        "threads_used": torch.get_num_threads(),
    }


def run_point(point: dict) -> dict:
    env = dict(os.environ)
    if point["memory"]:  # every freed block of 64 KiB or more back to the system: RSS follows live memory
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if point["threads"]:
        env["OMP_NUM_THREADS"] = str(point["threads"])
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(point)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"error: point {point['model']}:{point['seq_len']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_tokens(items: list[str]) -> dict[str, int]:
    tokens = dict(DEFAULT_TOKENS)
    for item in items:
        name, _, n = item.partition("=")
        tokens[name] = int(n)
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], help="conf/model options")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--tokens", nargs="*", default=[], metavar="MODEL=N", help="tokens per step, per model")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per point and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each point's process")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU time")
    parser.add_argument("--reference", default="tiny:256", help="MODEL:SEQ_LEN whose achieved FLOP/s predicts")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every point")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    tokens = parse_tokens(args.tokens)
    ref_model, _, ref_len = args.reference.partition(":")
    if ref_model not in args.models or int(ref_len or 0) not in args.seq_lens:
        parser.error(f"--reference {args.reference} is not one of the points (--models x --seq-lens)")
    points = []
    for model in args.models:
        for T in args.seq_lens:
            budget = tokens.get(model, DEFAULT_TOKENS["tiny"])
            points.append(
                dict(
                    model=model,
                    seq_len=T,
                    batch=max(1, budget // T),
                    steps=args.steps,
                    warmup=args.warmup,
                    threads=args.threads,
                    clock=args.clock,
                    set=args.set,
                    memory=False,
                )
            )
    results: dict[tuple[str, int], list[dict]] = {(p["model"], p["seq_len"]): [] for p in points}
    for r in range(args.rounds):
        for p in points if r % 2 == 0 else points[::-1]:
            res = run_point(p)
            results[(p["model"], p["seq_len"])].append(res)
            print(
                f"  round {r + 1}: {p['model']} T={p['seq_len']} batch {p['batch']}: "
                f"{res['seconds_per_step']:.3f} s/step",
                file=sys.stderr,
                flush=True,
            )
    memory: dict[tuple[str, int], dict] = {}
    for p in points:  # the peak of the second step (the first creates the optimizer state), malloc set to measure
        memory[(p["model"], p["seq_len"])] = run_point({**p, "memory": True, "warmup": 1, "steps": 1})

    def per_token(key: tuple[str, int]) -> float:  # seconds per token, median over rounds
        rs = results[key]
        return statistics.median(r["seconds_per_step"] / r["tokens_per_step"] for r in rs)

    ref_key = (ref_model, int(ref_len))
    ref = results[ref_key][0]
    rate = ref["flops_per_token"] / per_token(ref_key)  # achieved FLOP/s at the reference point
    first = next(iter(results.values()))[0]
    print(
        f"precision {first['precision']}, CPU {first['threads_used']} threads, {args.clock} clock, {args.steps} steps "
        f"x {args.rounds} rounds per point (median); reference {args.reference}: {rate / 1e9:.1f} GFLOP/s achieved"
    )
    print(
        f"{'model':<6} | {'T':>5} | {'batch':>5} | {'tokens/s':>8} | {'ms/token':>8} | {'predicted':>9} | "
        f"{'meas/pred':>9} | {'GFLOP/s':>7} | {'peak MB':>8} | {'planned MB':>10}"
    )
    for key, rs in results.items():
        r0 = rs[0]
        t = per_token(key)
        predicted = r0["flops_per_token"] / rate
        peak = memory[key]["peak_bytes"]
        print(
            f"{key[0]:<6} | {key[1]:>5} | {r0['batch']:>5} | {1 / t:>8.0f} | {1e3 * t:>8.3f} | {1e3 * predicted:>9.3f} | "
            f"{t / predicted:>9.2f} | {r0['flops_per_token'] / t / 1e9:>7.1f} | {peak / 1e6:>8.0f} | "
            f"{r0['planned_bytes'] / 1e6:>10.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
