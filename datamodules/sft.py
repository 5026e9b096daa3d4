"""Supervised finetuning data: instruction/response pairs or chat conversations, formatted by a chat template.

Each JSON Lines (or ``.json``, ``.gz``) row is one example, in either form:

- ``{"instruction": ..., "input": ... (optional), "response": ...}``: the user's message is the instruction,
  followed by a blank line and the input when there is one; the response is the assistant's message;
- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``: a
  conversation (any roles; ``system``, ``user`` and ``assistant`` are the usual ones).

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
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from datamodules.base import PreparedDataModule
from datamodules.sources import DataError, file_format, find_files
from datamodules.tokenizer import load_tokenizer, special_ids

IGNORE_INDEX = -100
CORPORA = Path(__file__).resolve().parent / "corpora"
EMBEDDED_SFT = CORPORA / "austen_sft.jsonl.gz"
DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
ASSISTANT = "assistant"


# ---------------------------------------------------------------------------------------------------- records


def read_records(files: Iterable[str | Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every JSON object of ``.jsonl`` / ``.json`` files (``.gz`` too); where = ``file:line``."""
    for path in files:
        path = Path(path)
        fmt = file_format(path)
        if fmt not in ("jsonl", "json"):
            raise DataError(
                f"data.paths: {path} is not JSON Lines or JSON (examples need .jsonl, .json or .gz of them)"
            )
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
                if fmt == "jsonl":
                    for lineno, line in enumerate(f, start=1):
                        if line.strip():
                            yield _record(line, f"{path}:{lineno}")
                else:
                    data = _parse(f.read(), str(path))
                    for i, record in enumerate(data if isinstance(data, list) else [data]):
                        yield _object(record, f"{path}[{i}]")
        except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt .gz, unreadable file
            raise DataError(f"{path}: cannot be read ({err})") from None


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None


def _record(line: str, where: str) -> tuple[str, dict[str, Any]]:
    return _object(_parse(line, where), where)


def _object(record: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def field_of(record: dict[str, Any], name: str, where: str, key: str) -> Any:
    """``record[name]``, or a one-line error naming the config key, the file and line, and the keys there are."""
    if name not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10])
        raise DataError(f"{where}: no field data.{key}={name!r} (keys: {keys}); set data.{key} to the right name")
    return record[name]


def text_of(record: dict[str, Any], name: str, where: str, key: str) -> str:
    value = field_of(record, name, where, key)
    if not isinstance(value, str):
        raise DataError(f"{where}: data.{key}={name!r} is {type(value).__name__}, not a string")
    return value


def resolve_paths(paths: Sequence[str] | None, default: Path, key: str = "paths") -> list[Path]:
    """The files of ``data.<key>`` (files, directories, globs), or the embedded default when None."""
    if paths is None:
        return [default]
    try:
        files, _ = find_files(paths)
    except DataError as err:
        raise DataError(str(err).replace("data.paths", f"data.{key}")) from None
    files = [f for f in files if file_format(f) in ("jsonl", "json")]
    if not files:
        raise DataError(f"data.{key}={list(paths)}: no .jsonl or .json file (or .gz of them) there")
    return files


def split_indices(n: int, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: ``round(n * val_fraction)`` examples (at least one each) picked by a seeded permutation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), or give data.val_paths")
    if n < 2:
        raise DataError(
            f"only {n} {what}: at least 2 are needed to hold one out for validation (or give data.val_paths)"
        )
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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


@dataclass
class PadCollate:
    """Causal-LM batches padded to the longest example of the batch: ``input_ids`` and shifted ``labels``.

    An example of n tokens gives n - 1 inputs; a label is the next token where that token is trained, else
    -100 (prompt tokens and padding).
    """

    pad_id: int

    def __call__(self, examples: list[SFTExample]) -> dict[str, torch.Tensor]:
        T = max(len(e.ids) for e in examples) - 1
        input_ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.ids) - 1
            ids = torch.from_numpy(e.ids)
            input_ids[i, :n] = ids[:-1]
            labels[i, :n] = torch.where(torch.from_numpy(e.trained[1:]), ids[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}


# ------------------------------------------------------------------------------------------------ DataModule


def _plain(value: Any) -> Any:
    """OmegaConf lists (what Hydra passes) as plain lists; a single string as a one-item list."""
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    return [str(v) for v in value]


class ExampleDataModule(PreparedDataModule):
    """What the example-based DataModules (SFT, classification) share: files, tokenizer, split, loaders, artefacts.

    Subclasses read their rows in ``_read`` and turn them into examples in ``_build``; ``prepare()`` does the
    rest and is idempotent (train.py calls it before building the model, whose vocabulary follows the tokenizer).
    """

    kind = "examples"
    embedded: Path = EMBEDDED_SFT

    def __init__(
        self,
        paths: list[str] | None,
        val_paths: list[str] | None,
        val_fraction: float,
        seq_len: int,
        batch_size: int,
        num_workers: int,
        tokenizer: str | None,
        seed: int,
        pin_memory: bool,
        skip_empty: bool,
    ) -> None:
        super().__init__()
        self.paths = _plain(paths)
        self.val_paths = _plain(val_paths)
        if self.paths is not None and not self.paths:
            raise DataError(
                "data.paths is empty: give .jsonl files, directories or globs (or null for the embedded set)"
            )
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if int(value) < 1:
                raise DataError(f"data.{name}={value} must be positive")
        if int(num_workers) < 0:
            raise DataError(f"data.num_workers={num_workers} must be >= 0")
        self.val_fraction = float(val_fraction)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.skip_empty = bool(skip_empty)

        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.bos_id = self.eos_id = self.pad_id = -1
        self.report: dict[str, Any] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._prepared = False

    # ---- reading

    def _read(self, where: str, record: dict[str, Any]) -> Any | None:
        """One row -> an example description, or None to skip it (counted); raise DataError for a bad row."""
        raise NotImplementedError

    def _train_tokenizer(self, train_rows: list[Any]) -> Tokenizer:
        """A tokenizer trained on the train rows, when none is given (subclasses that can train one override this)."""
        raise DataError(
            f"data={self.kind} needs a tokenizer: give init_from=CKPT (its tokenizer is used) or data.tokenizer=PATH"
        )

    def _build(self, rows: list[Any], split: str) -> tuple[Dataset, dict[str, Any]]:
        """Tokenized examples of one split and its report."""
        raise NotImplementedError

    def _collate(self) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _read_files(self, files: list[Path]) -> tuple[list[Any], dict[str, int]]:
        rows, counts = [], {"rows": 0, "skipped_empty": 0}
        for where, record in read_records(files):
            counts["rows"] += 1
            row = self._read(where, record)
            if row is None:
                counts["skipped_empty"] += 1
            else:
                rows.append(row)
        return rows, counts

    def empty(self, where: str, what: str) -> None:
        """An empty example: an error, or a skipped row with data.skip_empty=true."""
        if not self.skip_empty:
            raise DataError(f"{where}: empty {what}; fix the row or set data.skip_empty=true to drop such rows")

    # ---- preparation

    def prepare(self) -> None:
        """Read, split, tokenize. Idempotent."""
        if self._prepared:
            return
        files = resolve_paths(self.paths, self.embedded)
        rows, counts = self._read_files(files)
        if self.val_paths is not None:
            val_files = resolve_paths(self.val_paths, self.embedded, key="val_paths")
            val_rows, val_counts = self._read_files(val_files)
            train_rows = rows
            counts = {k: counts[k] + val_counts[k] for k in counts}
        else:
            val_files = []
            train_idx, val_idx = split_indices(len(rows), self.val_fraction, self.seed, f"{self.kind} examples")
            train_rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
        if not train_rows or not val_rows:
            which = "data.paths" if not train_rows else "data.val_paths"
            raise DataError(
                f"{which}: no {self.kind} examples in {[str(f) for f in (files if not train_rows else val_files)]}"
            )
        self._rows_read(train_rows, val_rows)

        if self.tokenizer_path is not None:
            tokenizer, source = load_tokenizer(self.tokenizer_path), self.tokenizer_path
        else:
            tokenizer, source = self._train_tokenizer(train_rows), "trained on the train split"
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = special_ids(tokenizer, name=str(self.tokenizer_path))

        self.train_dataset, train_report = self._build(train_rows, "train")
        self.val_dataset, val_report = self._build(val_rows, "val")
        self.report = {
            "kind": self.kind,
            "files": [str(f) for f in files],
            "val_files": [str(f) for f in val_files] if val_files else None,
            "val_split": "data.val_paths" if val_files else f"data.val_fraction={self.val_fraction} (seed {self.seed})",
            **counts,
            "tokenizer": {"source": source, "vocab_size": self.vocab_size},
            "seq_len": self.seq_len,
            "train": train_report,
            "val": val_report,
        }
        self._prepared = True
        print(self.summary())

    def _rows_read(self, train_rows: list[Any], val_rows: list[Any]) -> None:
        """Hook after reading and splitting, before tokenizing (the classifier discovers its labels here)."""

    def summary(self) -> str:
        r = self.report
        return (
            f"data={self.kind}: {r['train']['examples']} train / {r['val']['examples']} val examples, "
            f"{r['train']['truncated'] + r['val']['truncated']} truncated to data.seq_len={self.seq_len}, "
            f"{r['skipped_empty']} empty rows skipped (data_report.json)"
        )

    def tokenizer_source(self) -> Path | Tokenizer:
        if self.tokenizer_path is None:
            return self.tokenizer  # trained here, or the init_from checkpoint's
        source = Path(self.tokenizer_path)
        return source / "tokenizer.json" if source.is_dir() else source

    # ---- loaders

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=generator,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.prepare()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        self.prepare()
        return self._loader(self.val_dataset, train=False)


@dataclass
class _Conversation:
    where: str
    messages: list[dict[str, str]]
    form: str  # "instruction" or "chat"


class SFTDataModule(ExampleDataModule):
    """Instruction tuning: batches of ``{"input_ids", "labels"}`` padded to the longest example of the batch.

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
        batch_size: examples per batch, per device.
        tokenizer: a ``tokenizer.json``; None: the ``init_from`` checkpoint's (train.py passes it).
        skip_empty: drop rows with an empty instruction or response instead of stopping with an error.
    """

    kind = "sft"
    embedded = EMBEDDED_SFT

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
    ) -> None:
        super().__init__(
            paths, val_paths, val_fraction, seq_len, batch_size, num_workers, tokenizer, seed, pin_memory, skip_empty
        )
        self.template = ChatTemplate(DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template)
        self.instruction_field = instruction_field
        self.input_field = input_field
        self.response_field = response_field
        self.messages_field = messages_field

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
        return SFTDataset(examples), report

    def _collate(self) -> PadCollate:
        return PadCollate(self.pad_id)
