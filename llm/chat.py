"""A multi-turn chat in the terminal:

    python -m llm.chat ckpt_path=CKPT [device=cpu temperature=0.8 top_k=50 top_p=null max_new_tokens=null seed=null
                                       system="..." allow_unsafe_checkpoint=false]

The conversation is formatted with the checkpoint's chat template (``llm.generate.ChatFormat``, as the model was
finetuned) and each reply is printed token by token as it is generated (``Generation`` + ``TextStream``). A base
model (no chat template) has no conversation: each message is continued as plain text.

Commands: ``/help``, ``/reset``, ``/system TEXT``, ``/set KEY=VALUE ...``, ``/exit``; a line starting with ``//``
sends the rest as a message (``//reset`` says "/reset"). Ctrl-C during a reply stops it (the partial reply stays in
the conversation, as the user saw it); Ctrl-C at the prompt clears the line, as in Python's REPL and ollama; Ctrl-D
(or ``/exit``) leaves.

With ``seed=S`` (on the command line or by ``/set``) the replies from then on sample with seeds S, S+1, ...: the
same session replays, and two replies do not share their random draws.

Context rule (``Conversation.prompt``): the prompt is the system message, kept always, then as many of the most
recent turns as fit ``model.max_seq_len`` with room for ``max_new_tokens``; older turns are dropped for good, and
said once. ``max_new_tokens=null`` (the default) is half the context.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm.cli import parse_key_values
from llm.core.sampling import Generation, Sampling
from llm.errors import LLMError, UserError

PROMPT = ">>> "
SETTINGS: dict[str, type] = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int, "seed": int}
DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,
    "device": "cpu",
    "system": None,
    # litgpt chat's sampling defaults; temperature=0 is greedy
    "temperature": 0.8,
    "top_k": 50,
    "top_p": None,
    "max_new_tokens": None,  # null: half of the model's context
    "seed": None,
    "allow_unsafe_checkpoint": False,  # true: plain pickle, which runs any code the file holds (trusted files only)
}
COMMANDS = {  # command: (its argument, what it does)
    "/help": ("", "this list"),
    "/reset": ("", "forget the conversation (the system message stays)"),
    "/system": ("TEXT", "set the system message (no TEXT: remove it)"),
    "/set": ("KEY=VALUE ...", "change temperature, top_k, top_p, max_new_tokens, seed (no argument: show them)"),
    "/exit": ("", "leave (also /quit, Ctrl-D)"),
}
ALIASES = {"/quit": "/exit"}
KEYS_HELP = "Ctrl-C stops a reply or clears the line; Ctrl-D leaves; //text sends '/text'"


# ------------------------------------------------------------------------------------------------ the context


class Conversation:
    """The messages of a chat, and the prompt of the next reply within the context.

    ``render(messages) -> token ids`` is ``ChatFormat.prompt`` (the assistant's generation prompt included).
    """

    def __init__(self, render: Callable[[list[dict[str, str]]], list[int]], max_seq_len: int, system: str | None):
        self.render, self.max_seq_len, self.system = render, max_seq_len, system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)
        self.dropped = 0  # turns dropped so far, this session

    def messages(self, user: str) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.turns:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*out, {"role": "user", "content": user}]

    def prompt(self, user: str, max_new_tokens: int) -> tuple[list[int], str | None]:
        """(prompt ids for ``user``'s message, the notice to print when turns are dropped for the first time).

        A message that does not fit with the system message alone is a UserError, and nothing is dropped.
        """
        room = self.max_seq_len - max_new_tokens
        kept, self.turns = self.turns, []
        alone = len(self.render(self.messages(user)))
        self.turns = kept
        if alone > room:
            system = " with the system message" if self.system else ""
            raise UserError(
                f"this message takes {alone} prompt tokens{system}: with max_new_tokens={max_new_tokens} it does "
                f"not fit the {self.max_seq_len}-token context (shorten it, or /set max_new_tokens=N)"
            )
        first = self.dropped == 0
        while len(ids := self.render(self.messages(user))) > room:
            self.turns.pop(0)
            self.dropped += 1
        notice = None
        if first and self.dropped:
            notice = f"(older turns dropped to stay within the {self.max_seq_len}-token context)"
        return ids, notice

    def add(self, user: str, reply: str) -> None:
        self.turns.append((user, reply))

    def reset(self) -> None:
        self.turns = []


# ------------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Command:
    """One input line: ``name`` is "message", "empty", or a command without its slash."""

    name: str
    text: str = ""  # the message, or /system's text
    pairs: dict[str, str] = dataclasses.field(default_factory=dict)  # /set's KEY=VALUE


def parse_command(line: str) -> Command:
    """What a line asks for; an unknown command or a malformed argument is a UserError (one line)."""
    line = line.strip()
    if not line:
        return Command("empty")
    if line.startswith("//"):
        return Command("message", line[1:])
    if not line.startswith("/"):
        return Command("message", line)
    word, _, rest = line.partition(" ")
    word, rest = ALIASES.get(word, word), rest.strip()
    if word not in COMMANDS:
        raise UserError(f"unknown command {word} (/help lists them; //text sends a message starting with '/')")
    if word == "/system":
        return Command("system", rest)
    if word == "/set":
        pairs = {}
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"/set takes KEY=VALUE, got {item!r} (keys: {', '.join(SETTINGS)})")
            if key not in SETTINGS:
                raise UserError(f"/set: unknown setting {key!r} (keys: {', '.join(SETTINGS)})")
            pairs[key] = value
        return Command("set", pairs=pairs)
    if rest:
        raise UserError(f"{word} takes no argument")
    return Command(word[1:])


def _value(key: str, raw: Any) -> int | float | None:
    """A setting's value from text or a parsed CLI value, naming the key when it is wrong."""
    text = "null" if raw is None else str(raw)
    if text.lower() in ("null", "none", ""):
        if key == "temperature":
            raise UserError("temperature=null: give a number (0 is greedy)")
        return None
    kind = SETTINGS[key]
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"{key}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise UserError(f"{key}={text!r} must be finite")
    return value


def apply_set(sampling: Sampling, pairs: dict[str, Any], max_seq_len: int) -> Sampling:
    """``sampling`` with ``pairs`` (KEY: text or value) applied and checked; max_new_tokens=null: half the context."""
    values = {key: _value(key, raw) for key, raw in pairs.items()}
    if "max_new_tokens" in values:
        if values["max_new_tokens"] is None:
            values["max_new_tokens"] = max_seq_len // 2
        elif values["max_new_tokens"] >= max_seq_len:
            raise UserError(
                f"max_new_tokens={values['max_new_tokens']} must be below the model's {max_seq_len}-token "
                "context (room is left for the prompt)"
            )
    return dataclasses.replace(sampling, **values)  # Sampling checks the values, naming the wrong one


def describe(sampling: Sampling) -> str:
    return " ".join(f"{key}={'null' if (v := getattr(sampling, key)) is None else v}" for key in SETTINGS)


# ------------------------------------------------------------------------------------------------ the session


class Chat:
    """The REPL's state: a loaded model, its conversation and the sampling settings."""

    def __init__(self, loaded: Any, sampling: Sampling, system: str | None, out: Any = sys.stdout) -> None:
        self.loaded, self.sampling, self.out = loaded, sampling, out
        self.max_seq_len = loaded.model.cfg.max_seq_len
        self.seeded = 0  # replies since the seed was set: reply n samples with seed + n (a session replays)
        chat = loaded.chat
        render = chat.prompt if chat is not None else (lambda messages: loaded.encode(messages[-1]["content"]))
        self.conversation = Conversation(render, self.max_seq_len, system if chat is not None else None)
        # a model that has not learnt to end its turn goes on with the user's: stop there
        self.stop = [chat.ours.parts("user")[0].strip()] if chat is not None and chat.ours is not None else []

    def banner(self, path: str) -> str:
        loaded = self.loaded
        mode = "chat template: yes"
        if loaded.chat is None:
            mode = "chat template: none\na base model: each message is continued as plain text, on its own (no history)"
        commands = "  ".join(f"{c} {arg}".strip() for c, (arg, _) in COMMANDS.items())
        return (
            f"model: {loaded.name} ({path}), context {self.max_seq_len} tokens, {mode}\n"
            f"sampling: {describe(self.sampling)}\n"
            f"commands: {commands}  ({KEYS_HELP})"
        )

    def print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Do what ``line`` asks; False to leave. A UserError is the caller's to print."""
        command = parse_command(line)
        if command.name == "exit":
            return False
        if command.name == "help":
            self.print("\n".join(f"  {f'{c} {arg}':<22}{what}" for c, (arg, what) in COMMANDS.items()))
            self.print(f"  {KEYS_HELP}")
        elif command.name == "reset":
            self.conversation.reset()
            self.print("(conversation cleared)")
        elif command.name == "system":
            if self.loaded.chat is None:
                raise UserError("a base model has no chat template, hence no system message")
            self.conversation.system = command.text or None
            self.print(f"(system message {'set' if command.text else 'removed'})")
        elif command.name == "set":
            if command.pairs:
                self.sampling = apply_set(self.sampling, command.pairs, self.max_seq_len)
                self.seeded = 0 if "seed" in command.pairs else self.seeded
            self.print(f"({describe(self.sampling)})")
        elif command.name == "message":
            self.say(command.text)
        return True

    def say(self, text: str) -> None:
        ids, notice = self.conversation.prompt(text, self.sampling.max_new_tokens)
        if notice:
            self.print(notice)
        reply = self.stream(ids)
        if self.loaded.chat is not None:
            self.conversation.add(text, reply)  # a reply stopped by Ctrl-C stays as it was seen

    def stream(self, ids: list[int]) -> str:
        """Generate and print a reply token by token; Ctrl-C stops it. Returns the reply's text."""
        from llm.generate import TextStream

        loaded, sampling = self.loaded, self.sampling
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + self.seeded)
        self.seeded += 1
        run = Generation(loaded.model, [ids], sampling, eos_id=loaded.ids["eos_ids"], pad_id=loaded.pad_id)
        text = TextStream(loaded.tokenizer, stop=self.stop)
        steps = iter(run)
        try:
            for step in steps:
                self.print(text.push(step[0]), end="")
                if text.stopped:
                    run.stop(0)
            self.print(text.flush())
            if run.finish_reason[0] == "length":
                self.print(f"(reply cut at max_new_tokens={self.sampling.max_new_tokens})")
        except KeyboardInterrupt:
            steps.close()
            self.print()
        return text.text


def repl(chat: Chat, read: Callable[[str], str] = input) -> int:
    """Read lines until Ctrl-D or /exit; every error is one line and the chat goes on."""
    while True:
        reading = True
        try:
            line = read(PROMPT)
            reading = False
            if not chat.handle(line):
                return 0
        except EOFError:  # Ctrl-D at the prompt
            chat.print()
            return 0
        except KeyboardInterrupt:  # at the prompt: the line is cleared; elsewhere (encoding, say): back to it
            chat.print("\n(Ctrl-D or /exit leaves)" if reading else "")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the command


def _parse(argv: list[str]) -> Any:
    """The arguments (an OmegaConf dict), checked before the model is loaded; ``generate._parse``'s pattern."""
    args = parse_key_values(argv, DEFAULTS)
    values = {key: _value(key, args[key]) for key in SETTINGS}
    Sampling(**{**values, "max_new_tokens": values["max_new_tokens"] or 0})  # checked now, the context once loaded
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        from llm.generate import load_model  # after the arguments: it imports Lightning (seconds)
        from llm.training import safe_load

        safe_load.allow_unsafe(args.allow_unsafe_checkpoint)
        loaded = load_model(args.ckpt_path, args.device)
        sampling = apply_set(Sampling(), {key: args[key] for key in SETTINGS}, loaded.model.cfg.max_seq_len)
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading
        return 130
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        except ImportError:  # Windows
            pass
    chat = Chat(loaded, sampling, None if args.system is None else str(args.system))
    chat.print(chat.banner(str(args.ckpt_path)))
    if args.system is not None and loaded.chat is None:
        chat.print("(system= is ignored: a base model has no chat template)")
    return repl(chat)


if __name__ == "__main__":
    sys.exit(main())
