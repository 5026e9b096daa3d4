"""Sampling with a KV cache: ``generate`` completes a batch of token-id prompts, ``sample`` picks next tokens.

A batch is left-padded, so that every row's next token is in the last column; padding is masked out of
attention and each row's rotary positions start at 0 at its first real token, so a row's tokens do not depend
on the other rows. The prompts are run once through the model (prefill), filling the cache; then each step
feeds one token per row, which attends to the cache. A row stops at an end-of-sequence token or after
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Sampling:
    """One row's generation settings (checked when made: a bad value is a UserError naming it)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # a row's own generator: the same seed gives the same tokens whatever the batch

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)


def fits(prompt_lengths: Sequence[int], budgets: Sequence[int], max_len: int) -> bool:
    """Whether rows of these prompt lengths and max_new_tokens fit one left-padded batch of a max_len cache."""
    return max(prompt_lengths) + max(budgets) <= max_len


class Generation:
    """A batch of prompts generated one step at a time: the one implementation behind generate, chat and serve.

    Iterating yields, at each step, ``{row: token}`` for the rows that produced a token this step; a row ends at
    an end-of-sequence token (not yielded), at its ``max_new_tokens``, or when the caller calls ``stop(row)``
    (a stop string found in its text, a client gone). Finished rows are dropped from the batch and from the KV
    cache, so they cost nothing afterwards. ``finish_reason[row]`` is then "stop" or "length" (OpenAI's names)
    and ``tokens[row]`` the row's new tokens.

    Prompts longer than the context left for their ``max_new_tokens`` keep their last tokens. Rows whose prompt
    lengths and budgets do not fit one cache together (see ``fits``) are refused with ValueError: batch them apart.
    """

    def __init__(
        self,
        model: Transformer,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling | Sequence[Sampling] = Sampling(),
        *,
        eos_id: int | Sequence[int] | None = None,
        pad_id: int = 0,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generation needs at least one prompt, and no empty prompt (give it a BOS token)")
        settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings")
        max_len = model.cfg.max_seq_len
        self.budgets = [min(s.max_new_tokens, max_len - 1) for s in settings]
        self.prompts = [list(p)[-(max_len - n) :] for p, n in zip(prompts, self.budgets)]
        if not fits([len(p) for p in self.prompts], self.budgets, max_len):
            raise ValueError("these prompts and max_new_tokens do not fit one batch of model.max_seq_len; split it")
        self.model, self.settings, self.pad_id = model, settings, pad_id
        self.eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish_reason: list[str | None] = [None] * len(prompts)
        self._stopped: set[int] = set()
        self.generators = [
            torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(int(s.seed))
            if s.seed is not None and s.temperature > 0
            else None
            for s in settings
        ]

    def stop(self, row: int) -> None:
        """End ``row`` before its next step (its finish_reason becomes "stop")."""
        if self.finish_reason[row] is None:
            self._stopped.add(row)

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Next token of each active row from its logits (len(rows), V), with the row's own settings."""
        greedy = [i for i, r in enumerate(rows) if self.settings[r].temperature <= 0]
        out = [0] * len(rows)
        if greedy:  # one argmax for every greedy row
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                out[i] = t
        for i, r in enumerate(rows):
            s = self.settings[r]
            if s.temperature > 0:
                out[i] = int(sample(logits[i : i + 1], s.temperature, s.top_k, s.top_p, self.generators[r]))
        return out

    @torch.inference_mode()
    def __iter__(self) -> Iterator[dict[int, int]]:
        model, device = self.model, self.model.tok_embeddings.weight.device
        for r, budget in enumerate(self.budgets):
            if budget == 0:  # nothing to generate: done before the batch starts
                self.finish_reason[r] = "length"
        rows = [r for r, budget in enumerate(self.budgets) if budget > 0]  # batch index -> row, still generating
        if not rows:
            return
        prompts = [self.prompts[r] for r in rows]
        B, T0 = len(rows), max(len(p) for p in prompts)
        tokens = torch.full((B, T0), self.pad_id, dtype=torch.long, device=device)
        # valid key slots of the whole generation (B, T0 + max new): False on the left padding; the model reads the
        # first cached + new columns, so the generated slots are True from the start
        valid = torch.ones((B, T0 + max(self.budgets)), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # left padding: each row's last prompt token is in column T0 - 1
            tokens[i, T0 - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            valid[i, : T0 - len(p)] = False
        # Without padding, rotary positions are the cache slots (the model's default) and the mask is plainly causal.
        padded = not bool(valid.all())
        pos = (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0) if padded else None  # (B, T0): 0 at each start
        sharded = _is_fsdp(model)
        cache = model.new_kv_cache(B, T0 + max(self.budgets))

        def next_logits(x: torch.Tensor) -> torch.Tensor:  # x (B, T) -> (B, V) logits of the last position only
            mask = valid if padded else None
            if sharded:  # FSDP gathers the root's weights in forward's hooks: go through forward, not hidden/output
                return model(x, input_pos=pos, mask=mask, kv_cache=cache)[:, -1]
            h = model.hidden(x, input_pos=pos, mask=mask, kv_cache=cache)  # (B, T, C)
            return model.output(h[:, -1])

        was_training = model.training
        model.eval()
        try:
            logits = next_logits(tokens)  # prefill
            while rows:
                step: dict[int, int] = {}
                for r, t in zip(rows, self._sample(logits, rows)):
                    if r in self._stopped:
                        self.finish_reason[r] = "stop"
                    elif t in self.eos_ids:
                        self.finish_reason[r] = "stop"
                    else:
                        self.tokens[r].append(t)
                        step[r] = t
                        if len(self.tokens[r]) >= self.budgets[r]:
                            self.finish_reason[r] = "length"
                if step:
                    yield step  # the caller may stop() rows here
                for r in self._stopped:
                    if self.finish_reason[r] is None:
                        self.finish_reason[r] = "stop"
                keep = [i for i, r in enumerate(rows) if self.finish_reason[r] is None]
                if not keep:
                    break
                if len(keep) < len(rows):  # drop finished rows from the batch and the cache (B is dim 0 of both)
                    index = torch.tensor(keep, device=device)
                    cache.k = [k.index_select(0, index) for k in cache.k]
                    cache.v = [v.index_select(0, index) for v in cache.v]
                    cache.batch_size = len(keep)
                    valid, pos = valid.index_select(0, index), None if pos is None else pos.index_select(0, index)
                    rows = [rows[i] for i in keep]
                    if padded and bool(valid.all()):  # no padded row left: positions are the slots again
                        padded, pos = False, None
                nxt = torch.tensor([self.tokens[r][-1] for r in rows], dtype=torch.long, device=device)
                if pos is not None:
                    pos = pos[:, -1:] + 1  # (B, 1)
                logits = next_logits(nxt[:, None])  # one token per row
        finally:
            model.train(was_training)


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
    model.cfg.max_seq_len positions, prompt and new tokens together. All rows share the settings (see Generation
    for per-row settings and step-by-step tokens); with a seed, row i samples with seed + i.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    settings = [
        Sampling(max_new_tokens, temperature, top_k, top_p, None if seed is None else int(seed) + i)
        for i in range(len(prompts))
    ]
    run = Generation(model, prompts, settings, eos_id=eos_id, pad_id=pad_id)
    for _ in run:
        pass
    return run.tokens
