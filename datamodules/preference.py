"""Preference data for DPO: a prompt and two answers to it, the one preferred (chosen) and the other (rejected).

Each JSON Lines (or ``.json``, ``.gz``) row is one pair, in one of these forms (field names configurable):

- ``{"prompt": "...", "chosen": "...", "rejected": "..."}``: the prompt is a user message, each answer an
  assistant message;
- TRL's conversational form ``{"chosen": [messages], "rejected": [messages]}``: two conversations whose shared
  first messages are the prompt and whose last assistant messages differ;
- the prompt given apart, ``{"prompt" or "messages": [messages], "chosen": ..., "rejected": ...}``, each answer a
  string or a list of one assistant message.

A side of a pair is encoded as an SFT conversation (:func:`datamodules.sft.encode_conversations`, with the chat
template of ``data.chat_template`` or ``init_from``'s): BOS, the prompt's messages, the answer, EOS. Only the
answer and its EOS are labelled: the earlier assistant turns of a multi-turn prompt are context here, not what
the preference is about. A side longer than ``seq_len`` + 1 tokens is truncated (counted in the
report); a pair whose prompt leaves no answer token on a side, or whose sides are cut before they differ, is
dropped (counted too).

Batches are ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}``, each (B, T), right-padded to
one T for both sides, the labels shifted as in SFT (label t is token t + 1, -100 off the answer); and the same
concatenated on the batch axis, chosen first, as ``input_ids`` and ``labels`` (2B, T): the module runs both sides
in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.examples import ExampleDataModule, field_of
from datamodules.sft import ASSISTANT, DEFAULT_CHAT_TEMPLATE, ChatTemplate, PadCollate, SFTExample, encode_conversations
from datamodules.sources import CORPORA, DataError

EMBEDDED_PREFERENCE = CORPORA / "austen_preference.jsonl.gz"
SIDES = ("chosen", "rejected")


@dataclass
class PreferenceExample:
    chosen: SFTExample  # ids and trained mask of prompt + chosen answer
    rejected: SFTExample


class PreferenceDataset(Dataset):
    def __init__(self, examples: list[PreferenceExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PreferenceExample:
        return self.examples[i]


@dataclass
class PairCollate:
    """Both sides of B pairs padded together (one T), as SFT's :class:`~datamodules.sft.PadCollate` pads.

    ``input_ids`` and ``labels`` (2B, T) are the chosen sides then the rejected ones: what the module's one forward
    reads, and what callbacks.throughput counts; the per-side tensors (B, T) are views of them.
    """

    pad_id: int

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        B = len(examples)
        both = PadCollate(self.pad_id)([e.chosen for e in examples] + [e.rejected for e in examples])  # (2B, T)
        return {
            **both,
            "chosen_ids": both["input_ids"][:B],
            "chosen_labels": both["labels"][:B],
            "rejected_ids": both["input_ids"][B:],
            "rejected_labels": both["labels"][B:],
        }


@dataclass
class _Pair:
    where: str
    prompt: list[dict[str, str]]  # the messages before the answers
    chosen: str
    rejected: str
    form: str  # "text" (prompt and answers strings) or "conversation" (message lists)


class PreferenceDataModule(ExampleDataModule):
    """Preference pairs for DPO: batches of ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}``.

    Args:
        paths: JSON Lines / JSON files, directories or globs (``.gz`` too); None for the embedded set (the SFT
            set's questions on Austen's novels, the true answer chosen and another question's answer rejected,
            ``datamodules/corpora/austen_preference.jsonl.gz``).
        val_paths: held-out files; None to hold out ``val_fraction`` of the pairs of ``paths``.
        val_fraction: fraction of the pairs held out when there are no ``val_paths``.
        chat_template: as in :class:`datamodules.sft.SFTDataModule` (None: ``init_from``'s, else the default).
        prompt_field: key of the prompt: a string (a user message) or a list of messages.
        chosen_field, rejected_field: keys of the answers: strings, a list of one assistant message, or (without a
            prompt) whole conversations sharing the prompt's messages.
        messages_field: key of the prompt as a list of messages, when ``prompt_field`` is not in the row.
        seq_len: the longest side, in input tokens; longer ones are truncated (counted in the report).
        batch_size: pairs per batch, per device (the forward sees twice as many sequences).
        tokenizer: a ``tokenizer.json``; None: the ``init_from`` checkpoint's (train.py passes it).
        skip_empty: drop rows with an empty prompt or answer, or identical answers, instead of stopping.
    """

    kind: ClassVar[str] = "preference"
    embedded: ClassVar[Path] = EMBEDDED_PREFERENCE
    template: ChatTemplate

    def __init__(
        self,
        paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        val_fraction: float = 0.05,
        chat_template: str | None = None,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        messages_field: str = "messages",
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        tokenizer: str | None = None,
        seed: int = 1234,
        pin_memory: bool = True,
        skip_empty: bool = False,
    ) -> None:
        super().__init__(
            paths, val_paths, val_fraction, seq_len, batch_size, num_workers, tokenizer, seed, pin_memory, skip_empty
        )
        self.template = ChatTemplate(DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template)
        self.prompt_field = prompt_field
        self.chosen_field = chosen_field
        self.rejected_field = rejected_field
        self.messages_field = messages_field

    # ---- reading

    def _key(self, side: str) -> str:
        return f"{side}_field"

    def _read(self, where: str, record: dict[str, Any]) -> _Pair | None:
        answers = {side: field_of(record, getattr(self, self._key(side)), where, self._key(side)) for side in SIDES}
        if self.prompt_field in record:
            prompt, key = record[self.prompt_field], "prompt_field"
        elif self.messages_field in record:
            prompt, key = record[self.messages_field], "messages_field"
        elif all(isinstance(a, list) for a in answers.values()):
            return self._read_conversations(where, answers)
        else:
            keys = ", ".join(repr(k) for k in list(record)[:10])
            raise DataError(
                f"{where}: no prompt: neither data.prompt_field={self.prompt_field!r} nor "
                f"data.messages_field={self.messages_field!r} (keys: {keys}), and the answers are not conversations"
            )
        if isinstance(prompt, str):
            form, messages = "text", [{"role": "user", "content": prompt}]
        else:
            form, messages = "conversation", self._messages(where, prompt, key)
        if not any(m["content"].strip() for m in messages):
            return self.empty(where, f"prompt (data.{key}={getattr(self, key)!r})")
        texts = {side: self._answer(where, side, value) for side, value in answers.items()}
        form = form if all(isinstance(a, str) for a in answers.values()) else "conversation"
        return self._pair(where, messages, texts["chosen"], texts["rejected"], form)

    def _read_conversations(self, where: str, answers: dict[str, Any]) -> _Pair | None:
        """TRL's implicit prompt: the messages both conversations share; after them, one assistant message each."""
        chosen, rejected = (self._messages(where, answers[s], self._key(s)) for s in SIDES)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and _same(chosen[shared], rejected[shared]):
            shared += 1
        rest = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
        if not rest["chosen"] and not rest["rejected"]:
            return self._same_answers(where)
        for side, messages in rest.items():
            if len(messages) != 1 or messages[0]["role"] != ASSISTANT:
                roles = [m["role"] for m in messages]
                raise DataError(
                    f"{where}: data.{self._key(side)}={getattr(self, self._key(side))!r} must end in one"
                    f" '{ASSISTANT}' message after the {shared} messages both answers share (got {roles})"
                )
        if not any(m["content"].strip() for m in chosen[:shared]):
            return self.empty(where, "prompt (the messages chosen and rejected share)")
        return self._pair(
            where, chosen[:shared], rest["chosen"][0]["content"], rest["rejected"][0]["content"], "conversation"
        )

    def _answer(self, where: str, side: str, value: Any) -> str:
        """An answer given apart from the prompt: a string, or a list of one assistant message."""
        key = self._key(side)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            messages = self._messages(where, value, key)
            if len(messages) == 1 and messages[0]["role"] == ASSISTANT:
                return messages[0]["content"]
        got = [m.get("role") if isinstance(m, dict) else m for m in value] if isinstance(value, list) else value
        raise DataError(
            f"{where}: data.{key}={getattr(self, key)!r} must be a string or one '{ASSISTANT}' message"
            f" (got {type(value).__name__}: {str(got)[:80]})"
        )

    def _messages(self, where: str, value: Any, key: str) -> list[dict[str, str]]:
        name = f"data.{key}={getattr(self, key)!r}"
        if not isinstance(value, list):
            raise DataError(f"{where}: {name} is {type(value).__name__}, not a string or a list of messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                got = list(m) if isinstance(m, dict) else type(m).__name__
                raise DataError(
                    f"{where}: {name} message {i} must be an object with string 'role' and 'content' (got {got})"
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def _pair(self, where: str, prompt: list[dict[str, str]], chosen: str, rejected: str, form: str) -> _Pair | None:
        chosen, rejected = chosen.strip(), rejected.strip()
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not text:
                return self.empty(where, f"{side} answer (data.{self._key(side)}={getattr(self, self._key(side))!r})")
        if chosen == rejected:
            return self._same_answers(where)
        return _Pair(where, prompt, chosen, rejected, form)

    def _same_answers(self, where: str) -> None:
        if not self.skip_empty:
            raise DataError(
                f"{where}: the chosen and rejected answers are the same; fix the row or set data.skip_empty=true"
                " to drop such rows"
            )

    # ---- examples

    def _build(self, rows: list[_Pair], split: str) -> tuple[PreferenceDataset, dict[str, Any]]:
        # every chosen side, then every rejected side: pair i is encoded[i] and encoded[n + i]
        conversations = [[*r.prompt, {"role": ASSISTANT, "content": getattr(r, side)}] for side in SIDES for r in rows]
        encoded = encode_conversations(self.tokenizer, self.template, conversations, self.bos_id, self.eos_id)
        n = len(rows)
        limit = self.seq_len + 1  # seq_len inputs, each with the next token as label
        examples, truncated, dropped, same, tokens, trained = [], 0, [], [], 0, 0
        for i, row in enumerate(rows):
            sides = []
            for full, mask, last in (encoded[i], encoded[n + i]):
                answer = mask.copy()
                answer[:last] = False  # the last answer only: a multi-turn prompt's earlier answers are context
                sides.append(SFTExample(full[:limit], answer[:limit]))
                truncated += len(full) > limit
            if not all(s.trained[1:].any() for s in sides):  # the prompt alone fills seq_len on a side
                dropped.append(row.where)
                continue
            if np.array_equal(sides[0].ids, sides[1].ids):  # cut before the answers differ: nothing to prefer
                same.append(row.where)
                continue
            examples.append(PreferenceExample(*sides))
            tokens += sum(len(s.ids) for s in sides)
            trained += sum(int(s.trained[1:].sum()) for s in sides)
        if not examples:
            raise DataError(
                f"every {split} pair's prompt fills data.seq_len={self.seq_len} (no answer token left): raise data.seq_len"
            )
        report = {
            "examples": len(examples),
            "forms": {form: sum(r.form == form for r in rows) for form in ("text", "conversation")},
            "truncated": int(truncated),  # answers (chosen or rejected) cut at seq_len
            "dropped_prompt_too_long": len(dropped),
            "dropped_examples": dropped[:5],
            "dropped_same_when_truncated": len(same),  # both sides cut to the same tokens
            "dropped_same_examples": same[:5],
            "tokens": tokens,
            "response_tokens": trained,
        }
        return PreferenceDataset(examples), report

    def _collate(self) -> PairCollate:
        return PairCollate(self.pad_id)


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()
