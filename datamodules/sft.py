"""Supervised finetuning data: instruction/response pairs or chat conversations, formatted by a chat template.

Each JSON Lines (or ``.json``, ``.gz``) row is one example, in either form:

- ``{"instruction": ..., "input": ... (optional), "response": ...}``: the user's message is the instruction,
  followed by a blank line and the input when there is one; the response is the assistant's message;
- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``: a
  conversation (any roles; ``system``, ``user`` and ``assistant`` are the usual ones).

Reading, splitting and batching are every example set's (:mod:`datamodules.examples`).

The chat template turns a conversation into text: every message is the template with ``{role}`` and
``{content}`` filled in, the conversation starts with BOS and every assistant message ends with EOS right
after its content. With the default ``"<|{role}|>\\n{content}\\n"``::

    <|bos|><|user|>
    Which novel is this passage from? ...
    <|assistant|>
    Emma<|eos|>

The loss covers the assistant's content and its EOS only: every other token is labelled -100. The
template is kept with the tokenizer in the checkpoint, as a Jinja ``chat_template`` that Hugging Face's
``apply_chat_template`` renders to the same text (see :meth:`ChatTemplate.jinja`).

Prompt and response pieces are encoded separately (so the mask is exact token by token) and concatenated;
when the pieces meet at a newline, as in the default template, this is the same as encoding the whole text.

With ``packing``, the examples of a split are packed into rows of at most ``seq_len`` tokens, once, by best-fit
decreasing (:func:`pack_examples`), and the loader shuffles the rows (seeded). Packing once keeps the number of
items fixed, so the sampler's position in a checkpoint and the split of rows over DDP ranks stay valid; re-packing
each epoch would change both. The model's block-diagonal mask (``segments``) and positions restarting at 0 make
each example's logits those of the example alone, so which examples share a row does not matter.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from datamodules.examples import ExampleDataModule, text_of
from datamodules.sources import CORPORA, DataError

IGNORE_INDEX = -100
EMBEDDED_SFT = CORPORA / "austen_sft.jsonl.gz"
DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
ASSISTANT = "assistant"


# ---------------------------------------------------------------------------------------------- chat template


class ChatTemplate:
    """A conversation as text: each message is ``template`` with ``{role}`` and ``{content}`` filled in.

    The text starts with BOS; an assistant message's content is followed by EOS, then by the rest of the
    template. ``{content}`` must appear once, ``{role}`` any number of times; other characters are literal.
    Content is stripped of surrounding whitespace.
    """

    def __init__(self, template: str = DEFAULT_CHAT_TEMPLATE) -> None:
        if not isinstance(template, str) or template.count("{content}") != 1:
            raise DataError(f"data.chat_template={template!r} must contain {{content}} exactly once")
        self.template = template
        self._before, self._after = template.split("{content}")

    def parts(self, role: str) -> tuple[str, str]:
        """The text before and after a ``role`` message's content."""
        return self._before.replace("{role}", role), self._after.replace("{role}", role)

    @property
    def generation_prompt(self) -> str:
        """What follows a conversation to ask the model for the assistant's answer."""
        return self.parts(ASSISTANT)[0]

    def segments(self, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
        """``(text, is_response)`` pieces of a conversation, BOS and EOS excluded (EOS follows each response).

        Empty pieces are kept so that every message has the same number of pieces (before, content, after).
        """
        out = []
        for m in messages:
            before, after = self.parts(m["role"])
            out += [(before, False), (m["content"].strip(), m["role"] == ASSISTANT), (after, False)]
        return out

    def render(
        self, messages: Sequence[dict[str, str]], bos: str, eos: str, add_generation_prompt: bool = False
    ) -> str:
        """The conversation as one string, special tokens written out (what the Jinja template renders)."""
        text = bos
        for m in messages:
            before, after = self.parts(m["role"])
            text += before + m["content"].strip() + (eos if m["role"] == ASSISTANT else "") + after
        return text + (self.generation_prompt if add_generation_prompt else "")

    def jinja(self) -> str:
        """The same template in the Jinja dialect of Hugging Face's ``tokenizer_config.json`` ``chat_template``."""

        def expr(text: str) -> str:  # a literal with {role} substituted, as a Jinja expression
            return " + message['role'] + ".join(json.dumps(p) for p in text.split("{role}"))

        return (
            "{{ bos_token }}{% for message in messages %}"
            f"{{{{ {expr(self._before)} + message['content'] | trim }}}}"
            f"{{% if message['role'] == '{ASSISTANT}' %}}{{{{ eos_token }}}}{{% endif %}}"
            f"{{{{ {expr(self._after)} }}}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {json.dumps(self.generation_prompt)} }}}}{{% endif %}}"
        )


def encode_conversations(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversations: Sequence[Sequence[dict[str, str]]],
    bos_id: int,
    eos_id: int,
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(ids, is_response, last_response_start)`` per conversation: BOS, the pieces, EOS after each response.

    ``ids[:last_response_start]`` is the prompt of the last assistant message (its generation prompt included).
    All pieces go through one ``encode_batch`` call (the tokenizer runs them in parallel).
    """
    pieces = []
    for conversation in conversations:
        segs = template.segments(conversation)
        while segs and not segs[-1][1]:  # nothing to learn after the last answer's EOS
            segs.pop()
        pieces.append(segs)
    flat = [text for segs in pieces for text, _ in segs]
    encoded = iter(tokenizer.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
    out = []
    for segs in pieces:
        ids, mask, last = [bos_id], [False], 0
        for _, response in segs:
            piece = next(encoded).ids
            if response:
                last = len(ids)
            ids += piece
            mask += [response] * len(piece)
            if response:  # EOS teaches the model to stop
                ids.append(eos_id)
                mask.append(True)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), last))
    return out


# -------------------------------------------------------------------------------------------------- examples


@dataclass
class SFTExample:
    ids: np.ndarray  # (n,) tokens, at most seq_len + 1
    trained: np.ndarray  # (n,) bool, True on the tokens the loss covers (response content and EOS)
    prompt: np.ndarray | None = None  # val only: the tokens before the last response (for generation)
    prompt_text: str = ""
    reference: str = ""


class SFTDataset(Dataset):
    def __init__(self, examples: list[SFTExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


def inputs_and_labels(e: SFTExample) -> tuple[torch.Tensor, torch.Tensor]:
    """An example of n tokens as n - 1 inputs and their labels: the next token where that token is trained, else
    -100 (prompt tokens). Labels stay inside the example: its last input's label is its own last token."""
    ids = torch.from_numpy(e.ids)
    return ids[:-1], torch.where(torch.from_numpy(e.trained[1:]), ids[1:], IGNORE_INDEX)


@dataclass
class PadCollate:
    """Causal-LM batches padded to the longest example of the batch: ``input_ids`` and shifted ``labels``
    (-100 on prompt tokens and padding), (B, T)."""

    pad_id: int

    def __call__(self, examples: list[SFTExample]) -> dict[str, torch.Tensor]:
        T = max(len(e.ids) for e in examples) - 1
        input_ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.ids) - 1
            input_ids[i, :n], labels[i, :n] = inputs_and_labels(e)
        return {"input_ids": input_ids, "labels": labels}


# --------------------------------------------------------------------------------------------------- packing


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each holding at most ``capacity`` tokens: best-fit decreasing.

    Longest first, each example goes to the open row it fills the most (the one with the least room that still
    holds it), else to a new row. Deterministic (ties keep index order). The row is found by bisecting the sorted
    distinct room sizes (at most ``capacity`` of them), not by scanning every open row (a million examples: ~10 s).
    """
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct room sizes that some open row has
    open_rows: dict[int, list[int]] = {}  # room -> the open rows with that much room
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} has {n} tokens, not in [1, {capacity}]")
        j = bisect.bisect_left(rooms, n)
        if j < len(rooms):
            room = rooms[j]
            r = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room], rooms[j]
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(i)
        if room - n > 0:  # a full row is closed
            if room - n not in open_rows:
                bisect.insort(rooms, room - n)
            open_rows.setdefault(room - n, []).append(r)
    return rows


def sft_dataset(examples: list[SFTExample], seq_len: int, packing: bool) -> SFTDataset | PackedSFTDataset:
    """The examples as a dataset of examples, or of packed rows of at most ``seq_len`` tokens."""
    return PackedSFTDataset(examples, seq_len) if packing else SFTDataset(examples)


class PackedSFTDataset(Dataset):
    """Item i is row i: the examples packed into it (see :func:`pack_examples`). Rows are the items, so the sampler
    (shuffled, seeded; Lightning's DistributedSampler under DDP) orders and splits rows; ``examples`` keeps every
    example, in order (evaluation generates from them)."""

    def __init__(self, examples: list[SFTExample], seq_len: int) -> None:
        self.examples = examples
        self.rows = pack_examples([len(e.ids) - 1 for e in examples], seq_len)  # n tokens -> n - 1 inputs

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[SFTExample]:
        return [self.examples[j] for j in self.rows[i]]


@dataclass
class PackCollate:
    """Packed rows padded to the longest row of the batch: ``input_ids`` and ``labels`` as :class:`PadCollate`'s,
    ``positions`` restarting at 0 in each example and ``segments`` numbering a row's examples 0, 1, ... and its
    padding last (a segment of its own: padding never sees a real token), all (B, T). With the model's
    block-diagonal mask each example is computed as if alone."""

    pad_id: int

    def __call__(self, rows: list[list[SFTExample]]) -> dict[str, torch.Tensor]:
        T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), T), dtype=torch.long)
        segments = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for s, e in enumerate(row):
                n = len(e.ids) - 1
                input_ids[b, at : at + n], labels[b, at : at + n] = inputs_and_labels(e)
                positions[b, at : at + n] = torch.arange(n)
                segments[b, at : at + n] = s
                at += n
            segments[b, at:] = len(row)
        return {"input_ids": input_ids, "labels": labels, "positions": positions, "segments": segments}


# ------------------------------------------------------------------------------------------------ DataModule


@dataclass
class _Conversation:
    where: str
    messages: list[dict[str, str]]
    form: str  # "instruction" or "chat"


class SFTDataModule(ExampleDataModule):
    """Instruction tuning: batches of ``{"input_ids", "labels"}`` padded to the longest example of the batch, or,
    packed, rows of several examples with ``positions`` and ``segments`` (see :class:`PackCollate`).

    Args:
        paths: JSON Lines / JSON files, directories or globs (``.gz`` too); None for the embedded example set
            (questions about passages of Jane Austen's novels, ``datamodules/corpora/austen_sft.jsonl.gz``).
        val_paths: held-out files; None to hold out ``val_fraction`` of the examples of ``paths``.
        val_fraction: fraction of the examples held out when there are no ``val_paths``.
        chat_template: the template string (see :class:`ChatTemplate`); None for the one of ``init_from``'s
            checkpoint, else the default ``"<|{role}|>\\n{content}\\n"``.
        instruction_field, input_field, response_field: keys of an instruction row (input is optional).
        messages_field: key of a chat row's message list (each ``{"role", "content"}``).
        seq_len: the longest example, in input tokens; longer ones are truncated (counted in the report).
        batch_size: examples (packed: rows) per batch, per device.
        tokenizer: a ``tokenizer.json``; None: the ``init_from`` checkpoint's (train.py passes it).
        skip_empty: drop rows with an empty instruction or response instead of stopping with an error.
        packing: pack each split's examples into rows of at most ``seq_len`` tokens (:func:`pack_examples`, once);
            the loader shuffles the rows. The loss per token is the same as unpacked.
    """

    kind: ClassVar[str] = "sft"
    embedded: ClassVar[Path] = EMBEDDED_SFT
    template: ChatTemplate  # how a conversation becomes text; kept with the tokenizer in the checkpoint

    def __init__(
        self,
        paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        val_fraction: float = 0.05,
        chat_template: str | None = None,
        instruction_field: str = "instruction",
        input_field: str = "input",
        response_field: str = "response",
        messages_field: str = "messages",
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        tokenizer: str | None = None,
        seed: int = 1234,
        pin_memory: bool = True,
        skip_empty: bool = False,
        packing: bool = False,
    ) -> None:
        super().__init__(
            paths, val_paths, val_fraction, seq_len, batch_size, num_workers, tokenizer, seed, pin_memory, skip_empty
        )
        self.template = ChatTemplate(DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template)
        self.instruction_field = instruction_field
        self.input_field = input_field
        self.response_field = response_field
        self.messages_field = messages_field
        self.packing = bool(packing)

    def _read(self, where: str, record: dict[str, Any]) -> _Conversation | None:
        if self.messages_field in record:
            return self._read_chat(where, record[self.messages_field])
        if self.instruction_field not in record and self.response_field not in record:
            keys = ", ".join(repr(k) for k in list(record)[:10])
            raise DataError(
                f"{where}: neither data.messages_field={self.messages_field!r} nor "
                f"data.instruction_field={self.instruction_field!r} (keys: {keys}); set the field names"
            )
        instruction = text_of(record, self.instruction_field, where, "instruction_field").strip()
        response = text_of(record, self.response_field, where, "response_field").strip()
        extra = record.get(self.input_field)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: data.input_field={self.input_field!r} is {type(extra).__name__}, not a string")
        extra = (extra or "").strip()
        if not instruction and not extra:
            return self.empty(where, f"instruction (data.instruction_field={self.instruction_field!r})")
        if not response:
            return self.empty(where, f"response (data.response_field={self.response_field!r})")
        user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
        messages = [{"role": "user", "content": user}, {"role": ASSISTANT, "content": response}]
        return _Conversation(where, messages, "instruction")

    def _read_chat(self, where: str, messages: Any) -> _Conversation | None:
        key = f"data.messages_field={self.messages_field!r}"
        if not isinstance(messages, list):
            raise DataError(f"{where}: {key} is {type(messages).__name__}, not a list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                got = list(m) if isinstance(m, dict) else type(m).__name__
                raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content' (got {got})")
            out.append({"role": m["role"], "content": m["content"]})
        answers = [m for m in out if m["role"] == ASSISTANT]
        if not answers or not any(m["content"].strip() for m in answers):
            return self.empty(where, f"conversation: no non-empty '{ASSISTANT}' message in {key}")
        while out[-1]["role"] != ASSISTANT:  # nothing to learn after the last answer
            out.pop()
        if not out[-1]["content"].strip():
            return self.empty(where, f"last '{ASSISTANT}' message")
        return _Conversation(where, out, "chat")

    def _build(self, rows: list[_Conversation], split: str) -> tuple[SFTDataset, dict[str, Any]]:
        encoded = encode_conversations(
            self.tokenizer, self.template, [r.messages for r in rows], self.bos_id, self.eos_id
        )
        bos = self.tokenizer.id_to_token(self.bos_id) or ""
        limit = self.seq_len + 1  # seq_len inputs, each with the next token as label
        examples, truncated, dropped, tokens, trained = [], 0, [], 0, 0
        for row, (full, full_mask, last) in zip(rows, encoded):
            ids, mask = full[:limit], full_mask[:limit]
            truncated += len(full) > limit
            if not mask[1:].any():  # the prompt alone fills seq_len: no response token left to learn
                dropped.append(row.where)
                continue
            ex = SFTExample(ids, mask)
            if split == "val":  # what evaluation generates from, untruncated, and what it compares with
                ex.prompt = full[:last]
                ex.prompt_text = self.template.render(row.messages[:-1], bos, "", add_generation_prompt=True)[
                    len(bos) :
                ]
                ex.reference = row.messages[-1]["content"].strip()
            examples.append(ex)
            tokens += len(ids)
            trained += int(mask[1:].sum())
        if not examples:
            raise DataError(
                f"every {split} example's prompt fills data.seq_len={self.seq_len} (no response token left): "
                "raise data.seq_len"
            )
        report = {
            "examples": len(examples),
            "forms": {form: sum(r.form == form for r in rows) for form in ("instruction", "chat")},
            "truncated": int(truncated),
            "dropped_prompt_too_long": len(dropped),
            "dropped_examples": dropped[:5],
            "tokens": tokens,
            "response_tokens": trained,
        }
        dataset = sft_dataset(examples, self.seq_len, self.packing)
        if not self.packing:
            return dataset, report
        report["rows"] = len(dataset)
        # of rows padded to seq_len; a batch pads to its longest row only, so at most this
        report["padding"] = round(1 - (tokens - len(examples)) / (len(dataset) * self.seq_len), 4)
        return dataset, report

    def _collate(self) -> PadCollate | PackCollate:
        return PackCollate(self.pad_id) if self.packing else PadCollate(self.pad_id)

    @property
    def token_counts(self) -> np.ndarray | None:
        """Token counts of the train examples (prompts and responses), counted on first use from the ids already
        in memory: milliseconds for the embedded set, nothing added to preparation."""
        if self.train_dataset is None or self.tokenizer is None:
            return None
        if getattr(self, "_token_counts", None) is None:
            ids = [e.ids for e in self.train_dataset.examples]
            vocab = self.tokenizer.get_vocab_size()
            self._token_counts = np.bincount(np.concatenate(ids), minlength=vocab) if ids else np.zeros(vocab, np.int64)
        return self._token_counts

    def summary(self) -> str:
        text = super().summary()
        if not self.packing:
            return text
        train, val = self.report["train"], self.report["val"]
        packed = (
            f"; packed into {train['rows']} train / {val['rows']} val rows "
            f"({100 * train['padding']:.1f}% / {100 * val['padding']:.1f}% padding)"
        )
        return text.replace(" (data_report.json)", packed + " (data_report.json)")
