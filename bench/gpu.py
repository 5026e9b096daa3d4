"""Training throughput on one GPU: the `1b` config and a 7b-width model, under trainer=fsdp and trainer=gpu, and
the 7b width with LoRA and QLoRA adapters.

    python bench/gpu.py [--runs 1b:fsdp 1b:gpu 7b:fsdp 7b:gpu 7b:lora 7b:qlora] [--seq-len 2048] [--batch 1] [--steps 10 --warmup 3]
                        [--layers N] [--no-compile] [--sdpa] [--out results.json] [--set KEY=VALUE ...]
    python bench/gpu.py --device cpu --tiny        # the same code paths on the CPU, on a tiny model, in a minute

A run is MODEL:TRAINER. MODEL ``1b`` is conf/model/1b.yaml; ``7b`` is conf/model/7b.yaml's width (dim 4096, ffn
11008, 32 heads, vocabulary 32000) with as many layers as the memory planner (llm/core/memory.py, on the run as
llm/app/spec.py resolves it) says fit in 90% of the device's memory for that trainer (``--layers`` to choose).
TRAINER ``fsdp`` is trainer=fsdp on one device (FSDP2, bf16 compute / fp32 reduce) with activation checkpointing;
``gpu`` is trainer=gpu (one device, bf16-mixed autocast; it has no activation checkpointing); ``lora`` and
``qlora`` are trainer=gpu with rank-16 adapters on every projection and the base frozen (bf16; NF4 for QLoRA),
their MFU counted with 4N FLOPs per token (no weight gradients). All: bf16,
``model.compile=true`` (each block compiled), data=corpus (the embedded corpus, its tokenizer; the model keeps its
own vocabulary size), ``data.seq_len`` 2048, no validation. Each run is composed and resolved once as train.py does
it (``resolve`` in llm/app/spec.py: its precision and gradient accumulation), its DataModule and module built by
the run's experiment, its Trainer given the resolved settings.

Each run is a process of its own (a fresh allocator, so its peak memory is its own; one that fails, out of memory
for example, is reported and the next one runs) that trains through lightning.Trainer with our CausalLM and
PretrainDataModule, no callbacks or loggers, for ``warmup + steps`` steps, and times the ``steps`` after the warm-up
(compilation happens there) between two device synchronisations. Prints tokens/s, MFU (model FLOPs per token from
llm.core.flops, recomputation excluded, against the device's dense bf16 peak from llm.runtime.hardware), the peak of
torch.cuda.max_memory_allocated next to the planner's estimate (on the CPU: the process's peak RSS, interpreter and
all), and the first step's time (mostly compilation).

``--sdpa`` first times scaled_dot_product_attention (forward + backward, causal, bf16) at each model's attention
shape with every backend the GPU accepts (flash, memory-efficient, cuDNN, math), with grouped-query heads passed as
``enable_gqa`` and as repeated key/value heads, so the kernel the model gets (it passes ``enable_gqa``) is seen.
``--device cpu --tiny`` replaces 1b by `tiny` and the 7b width by tiny's (as many layers as the planner fits in
``--memory-gb``, 1 by default, up to ``--max-layers``, 6 by default), with ``trainer.accelerator=cpu``, one thread
(``--threads``), 128 tokens and 3 steps: every code path above except CUDA's, in under a minute. Results also go to
``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("1b", "7b")
TRAINERS = ("fsdp", "gpu", "lora", "qlora")
DEFAULT_RUNS = ("1b:fsdp", "1b:gpu", "7b:fsdp", "7b:gpu", "7b:lora", "7b:qlora")
# adapter runs: the base frozen, rank-16 adapters on every projection (QLoRA: the base in NF4)
ADAPTERS = {"lora": {"rank": 16, "alpha": 32.0}, "qlora": {"rank": 16, "alpha": 32.0, "quantize": "nf4"}}
FIT_FRACTION = 0.9  # of device memory the planner may fill when choosing the 7b-width layer count


# --------------------------------------------------------------------------------------------------- one run


def overrides_of(run: dict[str, Any]) -> list[str]:
    """train.py overrides of one run (without the 7b-width layer count, the run directory and the data cache)."""
    model, trainer = run["model"], run["trainer"]
    out = [f"model={'tiny' if run['tiny'] else model}"]
    if trainer == "fsdp":
        out += ["trainer=fsdp", "trainer.devices=1", "trainer.strategy.activation_checkpointing=true"]
    else:  # gpu, lora, qlora: one device (the adapter is added in `with_adapter`: it has no init_from to train on)
        out += ["trainer=gpu"]
    if run["device"] == "cpu":
        out += ["trainer.accelerator=cpu"]
    out += [
        "trainer.precision=bf16-mixed",
        f"model.compile={str(run['compile']).lower()}",
        f"data.seq_len={run['seq_len']}",
        f"data.batch_size={run['batch']}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "plan.check=false",  # the planner's verdict is printed next to the measurement instead
    ]
    if run["tiny"]:
        out += [f"model.max_seq_len={max(run['seq_len'], 256)}"]
    return [*out, *run["set"]]


def fitting_layers(run: dict[str, Any], vocab_size: int, memory: int) -> int:
    """The most layers of the 7b width (tiny's with --tiny) whose planned peak fits FIT_FRACTION of `memory`."""
    from llm.app import schema
    from llm.app.spec import memory_plan, resolve

    base = overrides_of(run)
    best = 0
    for layers in range(1, run["max_layers"] + 1):
        overrides = [*base, f"model.n_layers={layers}", f"plan.device_memory_gb={memory / 1e9}"]
        spec = with_adapter(resolve(schema.compose(overrides), overrides=overrides), run)
        if memory_plan(spec, vocab_size=vocab_size).total > FIT_FRACTION * memory:
            break
        best = layers
    if best == 0:
        raise SystemExit(f"error: not even one layer of {run['model']} fits {memory / 1e9:.1f} GB by the planner")
    return best


def with_adapter(spec: Any, run: dict[str, Any]) -> Any:
    """The resolved run with the adapter of a lora / qlora run: randomly initialised base weights stand in for
    init_from's (the speed and memory of a step do not depend on their values)."""
    if run["trainer"] not in ADAPTERS:
        return spec
    import dataclasses

    from llm.core.lora import LoRAConfig

    return dataclasses.replace(spec, adapter=LoRAConfig(**ADAPTERS[run["trainer"]]))


def child(run: dict[str, Any]) -> dict[str, Any]:
    """Train one run in this process and measure it."""
    import lightning as L
    import torch
    import train_cpu  # bench/ is this script's directory, first on sys.path

    from llm.app.builders import build
    from llm.app.spec import memory_plan
    from llm.core.flops import count_params, flops_per_token
    from llm.runtime.hardware import device_memory_bytes, peak_flops, peak_memory_bytes

    on_gpu = run["device"] == "cuda"
    if run["threads"]:
        torch.set_num_threads(run["threads"])
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("error: no GPU visible (use --device cpu --tiny to exercise the script on the CPU)")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    memory = int(run["memory_gb"] * 1e9) if run["memory_gb"] else device_memory_bytes(device)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*overrides_of(run), f"plan.device_memory_gb={memory / 1e9}"]
        # composed and resolved as train.py does it, in tmp, with the data cache `python train.py` uses
        spec = train_cpu.run_spec(overrides, tmp, base=())
        dm = spec.experiment.build_datamodule(spec)
        dm.prepare()
        layers = run["layers"]
        if run["model"] == "7b" and layers is None:
            layers = fitting_layers(run, dm.vocab_size, memory)
        if layers is not None:  # the same data: only the model's depth differs
            spec = train_cpu.run_spec([*overrides, f"model.n_layers={layers}"], tmp, base=())
        spec = with_adapter(spec, run)
        planned = memory_plan(spec, vocab_size=dm.vocab_size)
        model_cfg = spec.experiment.model_config(spec, dm)

        marks: dict[str, float] = {}
        steps, warmup = run["steps"], run["warmup"]

        def sync_time() -> float:
            if on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter()

        class Timer(L.Callback):
            """The clock (after a device synchronisation) at the fit's start, after the first step, and around
            the measured steps; nothing on the other steps, so the loop runs as it would."""

            def on_train_start(self, trainer, pl_module):
                marks["start"] = sync_time()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx):
                if idx == 0:
                    marks["first"] = sync_time()
                if idx == warmup - 1:
                    marks["begin"] = sync_time()
                if idx == warmup + steps - 1:
                    marks["end"] = sync_time()

        trainer: L.Trainer = build(
            spec.cfg.trainer,
            "trainer",
            **spec.trainer_arguments(),
            max_steps=warmup + steps,
            callbacks=[Timer()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        L.seed_everything(spec.seed, workers=True, verbose=False)
        module = spec.experiment.build_module(spec, dm)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit(module, datamodule=dm)

    seconds = marks["end"] - marks["begin"]
    tokens_per_sec = steps * run["batch"] * run["seq_len"] / seconds  # the timer counts batches (micro-batches)
    fpt = flops_per_token(model_cfg, run["seq_len"])
    if run["trainer"] in ADAPTERS:  # frozen weights: no weight-gradient matmuls, 4N of the 6N per token
        fpt = fpt * 2 / 3
    peak = peak_flops(device, "bf16-mixed")
    return {
        **run,
        "layers": model_cfg.n_layers,
        "params": count_params(model_cfg),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "tokens_per_sec": tokens_per_sec,
        "seconds_per_step": seconds / steps,
        "first_step_s": marks["first"] - marks["start"],
        "flops_per_token": fpt,
        "mfu": tokens_per_sec * fpt / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "planned_bytes": planned.total,
        "device_memory_bytes": memory,
    }


# --------------------------------------------------------------------------------------------------- SDPA backends


def _time_attention(q, k, v, gqa: bool, cuda: bool, repeats: int = 5) -> float:
    """Milliseconds of one causal SDPA forward + backward (after a warm-up call, which also tells whether the
    backend takes these inputs); K/V heads shared through enable_gqa, or repeated to the query heads."""
    import torch
    import torch.nn.functional as F

    H, K = q.shape[1], k.shape[1]

    def step() -> None:
        kk, vv = (k, v) if gqa or H == K else (k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1))
        F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa and H != K).sum().backward()

    step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def sdpa_check(device: str, shapes: dict[str, tuple[int, int, int]], seq_len: int, batch: int) -> list[str]:
    """Forward + backward time of causal bf16 SDPA per backend, for each (n_heads, n_kv_heads, head_dim)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines = []
    dev = torch.device(device)
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    for name, (H, K, D) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(batch, H, seq_len, D, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(batch, K, seq_len, D, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(batch, K, seq_len, D, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        for gqa in [True, False] if H != K else [False]:
            kind = "enable_gqa" if gqa else ("repeat_kv" if H != K else "mha")
            for backend, enum in backends.items():
                try:
                    with sdpa_kernel(enum):
                        result = f"{_time_attention(q, k, v, gqa, dev.type == 'cuda'):8.2f} ms"
                except RuntimeError as err:  # this backend does not take these inputs
                    result = f"unsupported ({str(err).strip().splitlines()[0][:60]})"
                lines.append(f"{name:<6} H={H:<3} K={K:<3} D={D:<4} {kind:<10} {backend:<9} {result}")
    return lines


# --------------------------------------------------------------------------------------------------- main


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", default=None, help=f"MODEL:TRAINER (default {' '.join(DEFAULT_RUNS)})"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (128 with --tiny)")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch, sequences")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measured ones (compilation)")
    parser.add_argument("--layers", type=int, default=None, help="7b-width layers (default: as many as fit)")
    parser.add_argument("--max-layers", type=int, default=None, help="search limit of the layer count (default 64)")
    parser.add_argument("--memory-gb", type=float, default=None, help="device memory to plan with (default: ask)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="model.compile=false")
    parser.add_argument("--sdpa", action="store_true", help="time each SDPA backend at the models' shapes first")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model sizes (with --device cpu: a dry run)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: 1 on the CPU)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-sdpa", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.child_sdpa is not None:
        job = json.loads(args.child_sdpa)
        shapes = {name: tuple(shape) for name, shape in job["shapes"].items()}
        print("\n".join(sdpa_check(job["device"], shapes, job["seq_len"], job["batch"])))
        return 0

    if args.runs is None:  # QLoRA needs bitsandbytes (its NF4 layer also runs on the CPU)
        import importlib.util

        have_bnb = importlib.util.find_spec("bitsandbytes") is not None
        args.runs = [r for r in DEFAULT_RUNS if have_bnb or not r.endswith("qlora")]
    runs = []
    for spec in args.runs:
        model, _, trainer = spec.partition(":")
        if model not in MODELS or trainer not in TRAINERS:
            parser.error(f"--runs {spec}: MODEL:TRAINER with MODEL in {MODELS} and TRAINER in {TRAINERS}")
        runs.append(
            dict(
                model=model,
                trainer=trainer,
                device=args.device,
                tiny=args.tiny,
                compile=args.compile,
                seq_len=args.seq_len or (128 if args.tiny else 2048),
                batch=args.batch,
                steps=args.steps or (3 if args.tiny else 10),
                warmup=args.warmup,
                layers=args.layers if model == "7b" else None,
                max_layers=args.max_layers or (6 if args.tiny else 64),
                memory_gb=args.memory_gb if args.memory_gb is not None else (1.0 if args.device == "cpu" else None),
                set=args.set,
                threads=args.threads or (1 if args.device == "cpu" else None),
            )
        )

    # CUDA is used by the child processes only, so that each has the whole device to itself
    env = dict(os.environ)
    if runs[0]["threads"]:  # on a shared CPU, one thread: OpenMP's barriers make 2 threads on a busy machine crawl
        env["OMP_NUM_THREADS"] = str(runs[0]["threads"])
    if args.sdpa:  # the model's shape only: composed, not resolved (that would ask the device here, not in a child)
        from llm.app import schema

        shapes = {}
        for name in dict.fromkeys("tiny" if args.tiny else r["model"] for r in runs):
            m = schema.compose([f"model={name}"]).model
            shapes[name] = [m.n_heads, m.n_kv_heads or m.n_heads, m.dim // m.n_heads]
        job = {"device": args.device, "shapes": shapes, "seq_len": runs[0]["seq_len"], "batch": args.batch}
        print(f"SDPA, causal, bf16, forward + backward, batch {args.batch} x {job['seq_len']} tokens:", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child-sdpa", json.dumps(job)], capture_output=True, text=True, env=env
        )
        lines = out.stdout.strip().splitlines() if out.returncode == 0 else [f"failed: {out.stderr[-600:]}"]
        for line in lines:
            print("  " + line, flush=True)

    print(
        f"{'run':<9} | {'layers':>6} | {'params':>7} | {'tokens/s':>9} | {'s/step':>7} | {'MFU':>6} | "
        f"{'peak GB':>7} | {'planned GB':>10} | {'1st step s':>10}",
        flush=True,
    )
    results = []
    for run in runs:
        name = f"{run['model']}:{run['trainer']}"
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(run)],
                capture_output=True,
                text=True,
                env=env,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"{name:<9} | timed out after {args.timeout} s", flush=True)
            results.append({**run, "error": "timeout"})
            continue
        if out.returncode != 0:
            tail = [line for line in out.stderr.strip().splitlines() if line.strip()][-3:]
            print(f"{name:<9} | failed: {' / '.join(tail)[-400:]}", flush=True)
            results.append({**run, "error": out.stderr[-4000:]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(
            f"{name:<9} | {r['layers']:>6} | {_count(r['params']):>7} | {r['tokens_per_sec']:>9.0f} | "
            f"{r['seconds_per_step']:>7.3f} | {mfu} | {r['peak_memory_bytes'] / 1e9:>7.2f} | "
            f"{r['planned_bytes'] / 1e9:>10.2f} | {r['first_step_s']:>10.1f}",
            flush=True,
        )
    done = [r for r in results if "error" not in r]
    if done:
        r = done[0]
        print(
            f"device: {r['device_name']} ({r['device_memory_bytes'] / 1e9:.0f} GB planned with), torch {r['torch']}; "
            f"bf16, compile={r['compile']}, micro-batch {r['batch']} x {r['seq_len']} tokens, {r['steps']} steps "
            f"after {r['warmup']} warm-up"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
