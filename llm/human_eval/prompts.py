"""The prompts of a study: JSON Lines rows read as the example sets are (datamodules.sources), in three forms.

- ``{"prompt": "..."}`` (a ``"response"`` there is its reference answer);
- ``{"instruction": ..., "input"?: ..., "response"?: ...}``: the user's message is the instruction, a blank line and
  the input, as finetuning reads it (datamodules.sft);
- ``{"messages": [{"role", "content"}, ...]}``: the conversation up to its last assistant message, which is the
  reference; a conversation that ends with another role has no reference.

Unlike finetuning, a reference is optional (a study of two checkpoints needs none). A bad row is a one-line
UserError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.examples import EXAMPLE_FORMATS, text_of
from datamodules.sft import ASSISTANT
from datamodules.sources import file_format, read_records
from llm.errors import UserError


@dataclass
class Prompt:
    """One row: the conversation to answer, and its reference answer when the row has one."""

    where: str  # file:line
    messages: list[dict[str, str]]
    reference: str | None = None

    @property
    def text(self) -> str:
        """The prompt a base model continues: the messages' contents."""
        return "\n\n".join(m["content"] for m in self.messages)

    @property
    def display(self) -> str:
        """What a rater sees: the user's message, or the conversation with its roles when there is more."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self.messages)


def prompt_of(where: str, record: dict[str, Any]) -> Prompt:
    """A row as a Prompt (the three forms of the module docstring); a bad row is a UserError naming it."""

    def optional(key: str) -> str | None:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: {key!r} is {type(value).__name__}, not a string")
        return None if value is None or not value.strip() else value.strip()

    if "messages" in record:
        return _conversation(where, record["messages"])
    if "prompt" in record:
        text = text_of(record, "prompt", where, "prompt").strip()
        if not text:
            raise UserError(f"{where}: empty 'prompt'")
        return Prompt(where, [{"role": "user", "content": text}], optional("response"))
    if "instruction" in record or "input" in record:
        instruction, extra = optional("instruction") or "", optional("input") or ""
        if not instruction and not extra:
            raise UserError(f"{where}: empty 'instruction'")
        user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra  # as datamodules.sft
        return Prompt(where, [{"role": "user", "content": user}], optional("response"))
    keys = ", ".join(repr(k) for k in list(record)[:10])
    raise UserError(f"{where}: a row needs 'prompt', 'instruction' or 'messages' (keys: {keys})")


def _conversation(where: str, messages: Any) -> Prompt:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = list(m) if isinstance(m, dict) else type(m).__name__
            raise UserError(f"{where}: message {i} must be an object with string 'role' and 'content' (got {got})")
        out.append({"role": m["role"], "content": m["content"].strip()})
    reference = None
    if out[-1]["role"] == ASSISTANT:
        reference = out.pop()["content"] or None
    if not out:
        raise UserError(f"{where}: the conversation has nothing before its assistant message")
    return Prompt(where, out, reference)


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if file_format(path) not in EXAMPLE_FORMATS:
        raise UserError(f"--prompts {path}: expected a .jsonl or .json file (or .gz of one)")
    prompts = [prompt_of(where, record) for where, record in read_records([path])]
    if not prompts:
        raise UserError(f"--prompts {path}: no rows")
    return prompts


def item_ids(prompts: Sequence[Prompt]) -> list[str]:
    """Stable ids: a hash of each conversation, ``-2``, ``-3``, ... for its repeats in file order."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        digest = hashlib.sha256(json.dumps(p.messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, 0) + 1
        out.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return out
