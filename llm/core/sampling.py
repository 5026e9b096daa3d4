"""Sampling with a KV cache: ``generate`` completes a batch of token-id prompts, ``sample`` picks next tokens.

A batch is left-padded, so that every row's next token is in the last column; padding is masked out of
attention and each row's rotary positions start at 0 at its first real token, so a row's tokens do not depend
on the other rows. The prompts are run once through the model (prefill), filling the cache; then each step
feeds one token per row, which attends to the cache. A row stops at an end-of-sequence token or after
``max_new_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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
    if not math.isfinite(temperature) or temperature < 0:  # nan would pass every comparison
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 1 (or null / 0 for no cut)")
    if top_p is not None and not 0 < top_p <= 1:  # nan fails this test too
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


class _Batch:
    """The rows generating together: their KV cache, which slots are valid, and their rotary positions.

    ``valid`` (B, capacity) is False on each row's left padding; the slots from ``cache.length`` on are True
    (what is fed next). ``pos`` holds the positions of the tokens last fed (B, T), or None while no row is
    padded (positions are then the slots, the model's default, and no mask is needed).
    """

    def __init__(self, model: Transformer, cache: Any, valid: torch.Tensor, pos: torch.Tensor | None, rows: list[int]):
        self.model, self.cache, self.valid, self.pos, self.rows = model, cache, valid, pos, rows
        self.sharded = _is_fsdp(model)

    @classmethod
    def prefill(
        cls, model: Transformer, prompts: list[list[int]], rows: list[int], capacity: int, pad_id: int
    ) -> tuple[_Batch, torch.Tensor]:
        """The prompts run once through the model, left-padded: the batch and its last logits (B, V)."""
        device = model.tok_embeddings.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
        valid = torch.ones((B, capacity), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # each row's last prompt token is in column T0 - 1
            tokens[i, T0 - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            valid[i, : T0 - len(p)] = False
        pos = None if bool(valid.all()) else (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0)  # 0 at each start
        batch = cls(model, model.new_kv_cache(B, capacity), valid, pos, rows)
        return batch, batch.forward(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T) -> (B, V) logits of the last position only; the cache takes the T new slots."""
        mask = None if self.pos is None else self.valid
        if self.sharded:  # FSDP gathers the root's weights in forward's hooks: go through forward, not hidden/output
            return self.model(x, input_pos=self.pos, mask=mask, kv_cache=self.cache)[:, -1]
        h = self.model.hidden(x, input_pos=self.pos, mask=mask, kv_cache=self.cache)  # (B, T, C)
        return self.model.output(h[:, -1])

    def advance(self, nxt: list[int]) -> torch.Tensor:
        """Feed one token per row; the next logits (B, V)."""
        x = torch.tensor(nxt, dtype=torch.long, device=self.valid.device)[:, None]
        if self.pos is not None:
            self.pos = self.pos[:, -1:] + 1  # (B, 1)
        return self.forward(x)

    def keep(self, index: list[int]) -> None:
        """Only the rows at ``index`` go on (B is dim 0 of the cache, the mask and the positions)."""
        i = torch.tensor(index, device=self.valid.device)
        self.cache.k = [k.index_select(0, i) for k in self.cache.k]
        self.cache.v = [v.index_select(0, i) for v in self.cache.v]
        self.cache.batch_size = len(index)
        self.valid = self.valid.index_select(0, i)
        self.pos = None if self.pos is None else self.pos.index_select(0, i)
        self.rows = [self.rows[j] for j in index]
        if self.pos is not None and bool(self.valid.all()):  # no padded row left: positions are the slots again
            self.pos = None

    def last_pos(self) -> torch.Tensor:
        """(B, 1) the position of each row's last fed token."""
        if self.pos is not None:
            return self.pos[:, -1:]
        n = self.cache.length
        return torch.full((len(self.rows), 1), n - 1, dtype=torch.long, device=self.valid.device)

    def merge(self, other: _Batch, capacity: int) -> None:
        """Append ``other``'s rows, right-aligning both caches on their last filled slot (the shorter one is
        left-padded with invalid slots, as a shorter prompt is), in a new cache of ``capacity`` slots."""
        S, So = self.cache.length, other.cache.length
        end = max(S, So)
        B, Bo = len(self.rows), len(other.rows)
        cache = self.model.new_kv_cache(B + Bo, capacity)
        pairs = [*zip(cache.k, self.cache.k, other.cache.k), *zip(cache.v, self.cache.v, other.cache.v)]
        for merged, mine, theirs in pairs:  # (B, n_kv_heads, slots, head_dim) each
            merged[:B, :, end - S : end] = mine[:, :, :S]
            merged[B:, :, end - So : end] = theirs[:, :, :So]
        cache.length = end
        valid = torch.zeros((B + Bo, capacity), dtype=torch.bool, device=self.valid.device)
        valid[:, end:] = True
        valid[:B, end - S : end] = self.valid[:, :S]
        valid[B:, end - So : end] = other.valid[:, :So]
        pos = torch.cat([self.last_pos(), other.last_pos()])
        self.cache, self.valid, self.rows = cache, valid, self.rows + other.rows
        self.pos = None if bool(valid.all()) else pos


class Generation:
    """A batch of prompts generated one step at a time: the one implementation behind generate, chat and serve.

    Iterating yields, at each step, ``{row: token}`` for the rows that produced a token this step; a row ends at
    an end-of-sequence token (not yielded), at its ``max_new_tokens``, or when the caller calls ``stop(row)``
    (a stop string found in its text, a client gone). Finished rows are dropped from the batch and from the KV
    cache, so they cost nothing afterwards. ``finish_reason[row]`` is then "stop" or "length" (OpenAI's names)
    and ``tokens[row]`` the row's new tokens.

    Rows can also join between steps (``add``, continuous batching): they are run through the model on their own
    (prefill) and merged into the running batch, which then steps them together with the others. A row's tokens do
    not depend on when it joined nor on the other rows (its own positions, padding masked, its own generator).

    Prompts longer than the context left for their ``max_new_tokens`` keep their last tokens. Rows whose prompt
    lengths and budgets do not fit one cache together (see ``fits``, ``can_add``) are refused with ValueError.
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
        if not prompts:
            raise ValueError("generation needs at least one prompt")
        self.model, self.pad_id, self.max_len = model, pad_id, model.cfg.max_seq_len
        self.eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
        self.prompts: list[list[int]] = []
        self.settings: list[Sampling] = []
        self.budgets: list[int] = []
        self.tokens: list[list[int]] = []
        self.finish_reason: list[str | None] = []
        self.generators: list[torch.Generator | None] = []
        self._stopped: set[int] = set()
        self._pending: list[int] = []  # rows added, not yet in the batch
        self._batch: _Batch | None = None
        self._started = False
        rows = self._register(prompts, sampling)
        if not fits([len(self.prompts[r]) for r in rows], [self.budgets[r] for r in rows], self.max_len):
            raise ValueError("these prompts and max_new_tokens do not fit one batch of model.max_seq_len; split it")

    def _register(self, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling]) -> list[int]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("no empty prompt (give it a BOS token)")
        settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings")
        first = len(self.prompts)
        device = self.model.tok_embeddings.weight.device
        for p, s in zip(prompts, settings):
            budget = min(s.max_new_tokens, self.max_len - 1)
            self.budgets.append(budget)
            self.prompts.append(list(p)[-(self.max_len - budget) :])
            self.settings.append(s)
            self.tokens.append([])
            self.finish_reason.append(None if budget > 0 else "length")  # nothing to generate: done at once
            seeded = s.seed is not None and s.temperature > 0
            self.generators.append(torch.Generator(device=device).manual_seed(int(s.seed)) if seeded else None)
        rows = list(range(first, len(self.prompts)))
        self._pending += [r for r in rows if self.budgets[r] > 0]
        return rows

    def can_add(self, prompt_lengths: Sequence[int], budgets: Sequence[int]) -> bool:
        """Whether rows of these prompt lengths and max_new_tokens can join between the coming steps."""
        lengths = [min(n, self.max_len - min(b, self.max_len - 1)) for n, b in zip(prompt_lengths, budgets)]
        pending = [len(self.prompts[r]) for r in self._pending]
        slots = 0 if self._batch is None else self._batch.cache.length + 1  # after the next feed
        left = [self.budgets[r] - len(self.tokens[r]) for r in self._active()] + [
            self.budgets[r] for r in self._pending
        ]
        return max([slots, *pending, *lengths]) + max([*left, *budgets]) <= self.max_len

    def add(self, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling] = Sampling()) -> list[int]:
        """Rows that join the batch before the next step (call it between steps); their row numbers."""
        settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if not self.can_add([len(p) for p in prompts], [s.max_new_tokens for s in settings]):
            raise ValueError("these rows do not fit the running batch within model.max_seq_len; start another")
        return self._register(prompts, settings)

    def _active(self) -> list[int]:
        return [] if self._batch is None else [r for r in self._batch.rows if self.finish_reason[r] is None]

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

    def _join(self, logits: torch.Tensor | None) -> torch.Tensor:
        """Prefill the pending rows and merge them into the batch; the logits of every row of the batch."""
        rows, self._pending = self._pending, []
        for r in rows:
            if r in self._stopped:  # stopped before it ever ran
                self.finish_reason[r] = "stop"
        rows = [r for r in rows if self.finish_reason[r] is None]
        if not rows:
            assert logits is not None
            return logits
        prompts = [self.prompts[r] for r in rows]
        left = [self.budgets[r] - len(self.tokens[r]) for r in self._active()] + [self.budgets[r] for r in rows]
        if self._batch is None:
            self._batch, logits = _Batch.prefill(
                self.model, prompts, rows, max(map(len, prompts)) + max(left), self.pad_id
            )
            return logits
        new, new_logits = _Batch.prefill(self.model, prompts, rows, max(map(len, prompts)), self.pad_id)
        self._batch.merge(new, max(self._batch.cache.length, new.cache.length) + max(left))
        return torch.cat([logits, new_logits])

    @torch.inference_mode()
    def __iter__(self) -> Iterator[dict[int, int]]:
        if self._started:
            raise RuntimeError("a Generation is iterated once")
        self._started = True
        model = self.model
        was_training = model.training
        model.eval()
        logits: torch.Tensor | None = None
        try:
            while True:
                if self._pending:
                    logits = self._join(logits)
                if self._batch is None or not self._batch.rows:
                    return
                rows = self._batch.rows
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
                    yield step  # the caller may stop() rows and add() rows here
                for r in self._stopped:
                    if self.finish_reason[r] is None:
                        self.finish_reason[r] = "stop"
                keep = [i for i, r in enumerate(rows) if self.finish_reason[r] is None]
                if not keep:  # the batch is done; rows added meanwhile start a new one
                    self._batch, logits = None, None
                    continue
                if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                    self._batch.keep(keep)
                logits = self._batch.advance([self.tokens[r][-1] for r in self._batch.rows])
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
