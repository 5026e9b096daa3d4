"""Generation speed: our KV-cache loop (llm.generate) against transformers' `generate`, same weights.

    python bench/generate.py [--shapes 256x4 512x8 --new 64 --batches 1 8 --repeats 5 --threads N --clock wall]

A random Llama is built by transformers, saved, and converted with `python -m llm.convert from-hf`, so both
sides run the very same weights. Both decode greedily (transformers: do_sample=False) in float32 on the CPU
with the same left-padded prompts, for exactly `--new` tokens (no EOS: the id is out of the vocabulary), and the
new tokens are checked equal. Prints tokens per second (new tokens of the whole batch / time, best of
`--repeats`, the two sides taking turns) and the ratio ours / transformers. On a shared machine whose load
varies, `--threads 1 --clock cpu` times the process's own CPU work instead of the wall clock.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def best_times(fns: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Best time of each function, the functions run in turn (so a busy spell of a shared machine slows both
    sides rather than one); one warm-up call each first."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def _run_ours(result: dict, model, prompts: list[list[int]], n: int, eos: int) -> None:
    from llm.core.sampling import generate

    result["ours"] = generate(model, prompts, n, eos_id=eos, pad_id=2)


def _run_hf(result: dict, model, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: int) -> None:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=2,
        )
    result["hf"] = out[:, ids.shape[1] :].tolist()


def bench_shape(dim: int, layers: int, args: argparse.Namespace) -> None:
    import transformers

    from llm.convert import from_hf
    from llm.generate import load_for_inference

    heads = dim // 64
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=dim,
        intermediate_size=int(8 * dim / 3 / 64 + 1) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=args.prompt_len + args.new,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        from_hf(Path(tmp) / "hf", Path(tmp) / "model.ckpt")  # the very same weights, through our converter
        ours, _, _ = load_for_inference(Path(tmp) / "model.ckpt")
    n_params = sum(p.numel() for p in ours.parameters())
    no_eos = args.vocab + 1  # never produced: every row runs the full --new tokens on both sides
    shape = f"{dim}x{layers} ({heads}h/{max(1, heads // 2)}kv, {n_params / 1e6:.1f}M)"
    g = torch.Generator().manual_seed(1)
    for batch in args.batches:
        lengths = [args.prompt_len - (i * 5) % (args.prompt_len // 2) for i in range(batch)]  # uneven: padding
        prompts = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]
        T0 = max(lengths)
        ids = torch.tensor([[2] * (T0 - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])

        result: dict[str, list[list[int]]] = {}
        run_ours = partial(_run_ours, result, ours, prompts, args.new, no_eos)
        run_hf = partial(_run_hf, result, hf, ids, mask, args.new, no_eos)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = best_times({"ours": run_ours, "hf": run_hf}, args.repeats, clock)
        t_ours, t_hf = times["ours"], times["hf"]
        n_tokens = batch * args.new
        same = result["ours"] == result["hf"]
        print(
            f"{shape:<26} | {batch:>5} | {n_tokens / t_ours:>10.1f} | {n_tokens / t_hf:>9.1f} | "
            f"{t_hf / t_ours:>5.2f} | {'yes' if same else 'NO'}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["256x4", "512x8"], help="DIMxLAYERS; head_dim 64, GQA 2:1")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, for a shared, busy machine (use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(
        f"float32, vocab {args.vocab}, prompts of {args.prompt_len // 2 + 1}-{args.prompt_len} tokens (left-padded), "
        f"{args.new} new tokens, greedy; CPU, {torch.get_num_threads()} threads, {args.clock} clock; transformers "
        f"{transformers.__version__}, torch {torch.__version__}"
    )
    print(
        f"{'model (dim x layers)':<26} | {'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ratio':>5} | same tokens"
    )
    for shape in args.shapes:
        dim, layers = (int(v) for v in shape.lower().split("x"))
        bench_shape(dim, layers, args)


if __name__ == "__main__":
    main()
