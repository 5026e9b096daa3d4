"""Sampling with a KV cache: ``generate`` completes a batch of token-id prompts, ``sample`` picks next tokens.

A batch is left-padded, so that every row's next token is in the last column; padding is masked out of
attention and each row's rotary positions start at 0 at its first real token, so a row's tokens do not depend
on the other rows. The prompts are run once through the model (prefill), filling the cache; then each step
feeds one token per row, which attends to the cache. A row stops at an end-of-sequence token or after
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.core.model import Transformer
from llm.errors import UserError


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FSDPModule)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V).

    temperature <= 0: argmax. Otherwise softmax(logits / temperature) restricted to the top_k tokens (None or 0:
    all) and to the nucleus: the most likely tokens whose cumulative probability first reaches top_p (None or
    1: all; the most likely token always stays, so a tiny top_p is greedy).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Reject settings that would silently do something else than asked, naming the argument."""
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 1 (or null / 0 for no cut)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] (or null for no cut)")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    seed: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (prompt excluded), each list ending before its first EOS (excluded).

    Prompts longer than the context left for generation keep their last tokens: a row uses at most
    model.cfg.max_seq_len positions, prompt and new tokens together.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt (give it a BOS token)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    max_len = model.cfg.max_seq_len
    max_new_tokens = min(max_new_tokens, max_len - 1)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    keep = max_len - max_new_tokens
    prompts = [list(p)[-keep:] for p in prompts]
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)

    tokens = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
    # valid key slots of the whole generation (B, T0 + max_new_tokens): False on the left padding; the model reads
    # the first cached + new columns, so the generated slots are True from the start
    valid = torch.ones((B, T0 + max_new_tokens), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: each row's last prompt token is in column T0 - 1
        tokens[i, T0 - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        valid[i, : T0 - len(p)] = False
    # Without padding, rotary positions are the cache slots (the model's default) and the mask is plainly causal.
    padded = not bool(valid.all())
    pos = (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0) if padded else None  # (B, T0): 0 at each row's start
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    sharded = _is_fsdp(model)

    def next_logits(x: torch.Tensor) -> torch.Tensor:  # x (B, T) -> (B, V) logits of the last position only
        mask = valid if padded else None
        if sharded:  # FSDP gathers the root's weights in forward's hooks: go through forward, not hidden/output
            return model(x, input_pos=pos, mask=mask, kv_cache=cache)[:, -1]
        h = model.hidden(x, input_pos=pos, mask=mask, kv_cache=cache)  # (B, T, C)
        return model.output(h[:, -1])

    try:
        cache = model.new_kv_cache(B, T0 + max_new_tokens)
        logits = next_logits(tokens)  # prefill
        out = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for n in range(1, max_new_tokens + 1):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = nxt.masked_fill(done, pad_id)  # finished rows only produce padding
            out[:, n - 1] = nxt
            done |= torch.isin(nxt, eos)
            if n == max_new_tokens or bool(done.all()):
                break
            if padded:
                pos = pos[:, -1:] + 1  # (B, 1)
            logits = next_logits(nxt[:, None])  # one token per row
    finally:
        model.train(was_training)

    results = []
    for row in out[:, :n].tolist():
        stop = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:stop])
    return results
