"""The two CPU fast paths of a training step, each against what it replaced, side by side in one run.

    python bench/cpu_kernels.py [--batch 16 --seq 256 --vocab 4096] [--rounds 7] [--threads N]

- loss: ``F.cross_entropy(logits.float())`` (PyTorch's ops, still used on GPUs) against our chunked
  ``ChunkedCrossEntropy`` (llm/training/cross_entropy.py), forward and backward of bf16 logits (B*T, V);
- attention: one ``Attention`` layer of the default model (256 wide, 8 heads, 4 key/value heads) under bf16
  autocast, forward and backward, with SDPA in bf16 (autocast's choice) against float32 (``attention_dtype``).

Each round times every variant once, alternating, over the same inputs; prints the median milliseconds per call
over the rounds, the median ratio, and the largest difference of the results (loss values, input gradients).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.core import model as model_lib  # noqa: E402
from llm.core.config import ModelConfig  # noqa: E402
from llm.training.cross_entropy import ChunkedCrossEntropy  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats * 1000, out


def loss_variants(n: int, vocab: int):
    torch.manual_seed(0)
    logits = (torch.randn(n, vocab) * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,))

    def pytorch():
        x = logits.detach().requires_grad_()
        loss = F.cross_entropy(x.float(), labels)
        loss.backward()
        return loss.detach(), x.grad

    def chunked():
        x = logits.detach().requires_grad_()
        loss = ChunkedCrossEntropy.apply(x, labels)[0]
        loss.backward()
        return loss.detach(), x.grad

    return {"F.cross_entropy(float32)": pytorch, "ChunkedCrossEntropy": chunked}


def attention_variants(batch: int, seq: int):
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=4096, max_seq_len=seq)
    torch.manual_seed(0)
    layer, rope = model_lib.Attention(cfg), model_lib.RotaryEmbedding(cfg)
    x0 = torch.randn(batch, seq, cfg.dim)
    real = model_lib.attention_dtype

    def run(compute: torch.dtype | None):
        def step():
            model_lib.attention_dtype = (lambda *a, **k: compute) if compute is not None else real
            try:
                x = x0.clone().requires_grad_()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    cos, sin = rope(start=0, length=seq, dtype=torch.bfloat16)
                    y = layer(x, cos, sin)
                y.float().square().mean().backward()
                return y.detach().float(), x.grad
            finally:
                model_lib.attention_dtype = real

        return step

    return {"SDPA bf16 (autocast)": run(torch.bfloat16), "SDPA float32 (ours)": run(None)}


def compare(title: str, variants: dict, rounds: int, repeats: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs: dict[str, object] = {}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ms, outs[name] = timed(variants[name], repeats)
            times[name].append(ms)
    first = names[0]
    print(f"\n{title}")
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(times[first], times[name]))
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs[first], outs[name]))
        print(f"  {name:<26} {statistics.median(times[name]):8.2f} ms   {ratio:5.2f}x faster   max |diff| {diff:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="calls timed together in a round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    compare("loss, forward + backward", loss_variants(args.batch * args.seq, args.vocab), args.rounds, args.repeats)
    compare("attention layer, forward + backward", attention_variants(args.batch, args.seq), args.rounds, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
