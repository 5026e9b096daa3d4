"""Text generation from a checkpoint:

    python -m llm.generate ckpt_path=CKPT prompt="..." [max_new_tokens=64 temperature=0 top_k=null top_p=null seed=0]

`prompt=[a,b,c]` generates for a batch of prompts (printed in order, separated by `---` lines). `temperature=0` is
greedy; otherwise the logits are divided by the temperature, cut to the `top_k` most likely tokens and to the
smallest set whose probability reaches `top_p`, and sampled with a generator seeded by `seed` (the same seed
gives the same text). Sampling itself (KV cache, left padding) is llm/core/sampling.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm.core.model import Transformer
from llm.core.sampling import check_sampling, generate
from llm.errors import LLMError, UserError
from llm.training import checkpoint


def load_for_inference(ckpt_path: str | Path, device: str = "cpu") -> tuple[Transformer, Any, dict[str, Any]]:
    """(model in eval mode, tokenizers.Tokenizer or None, special token ids) from a training or converted checkpoint.

    The tokenizer is the checkpoint's own, else the run directory's `tokenizer.json` next to `checkpoints/`.

    The model is built on the meta device and materialised empty, so the checkpoint's weights are the only
    initialisation (no random init of a large model just to overwrite it).
    """
    from tokenizers import Tokenizer

    ckpt = checkpoint.load(ckpt_path)
    cfg = checkpoint.model_config_of(ckpt, ckpt_path)
    state = checkpoint.model_state(ckpt, cfg, ckpt_path)  # names and shapes checked
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"device={device!r}: {err}") from err
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)  # re-ties a tied head (Transformer._apply)
    model.rope.reset_parameters()  # the rotary tables are computed, not loaded
    model.load_state_dict(state, strict=not cfg.tie_embeddings)  # a tied checkpoint may lack output.weight
    tokenizer_json = ckpt.get("tokenizer")
    if tokenizer_json is None:
        candidate = Path(ckpt_path).resolve().parent.parent / "tokenizer.json"  # <run_dir>/checkpoints/x.ckpt
        if candidate.is_file():
            tokenizer_json = candidate.read_text(encoding="utf-8")
            ckpt = {**ckpt, "tokenizer": tokenizer_json}
    tokenizer = None if tokenizer_json is None else Tokenizer.from_str(tokenizer_json)
    return model.eval(), tokenizer, checkpoint.special_ids(ckpt)


DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,
    "prompt": "",
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "seed": 0,
    "device": "cpu",
}


def _parse(argv: list[str]) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"arguments are key=value, got {bad[0]!r} (known keys: {', '.join(DEFAULTS)})")
    try:
        args = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as err:
        raise UserError(f"could not parse the arguments: {str(err).splitlines()[0]}") from err
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown argument(s): {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    if not args.ckpt_path:
        raise UserError("ckpt_path=CKPT is required")
    for key, kind in [("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float), ("seed", int)]:
        value = args[key]
        if value is not None:
            try:
                args[key] = kind(value)
            except (TypeError, ValueError) as err:
                raise UserError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from err
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        model, tokenizer, ids = load_for_inference(args.ckpt_path, args.device)
        if tokenizer is None:
            raise UserError(f"{args.ckpt_path}: no tokenizer in the checkpoint nor in its run directory")
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [str(p) for p in args.prompt] if not isinstance(args.prompt, (str, int, float)) else [str(args.prompt)]
    start_token = next((ids[r] for r in ("bos", "eos") if ids.get(r) is not None), 0)
    encoded = [tokenizer.encode(p).ids or [start_token] for p in prompts]  # an empty prompt starts from BOS
    start = time.perf_counter()
    new = generate(
        model,
        encoded,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=ids["eos_ids"],
        pad_id=ids["pad"] if ids.get("pad") is not None else 0,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    print("\n---\n".join(prompt + tokenizer.decode(tokens) for prompt, tokens in zip(prompts, new)))
    n = sum(len(t) for t in new)
    print(f"[{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
