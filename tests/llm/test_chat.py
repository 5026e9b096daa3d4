"""llm.chat: the context keeps the system message and the latest turns (said once), commands parse to one-line
errors, and the real command in a pseudo-terminal streams the greedy reply, obeys its commands, survives Ctrl-C and
leaves on Ctrl-D."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from llm import chat
from llm.chat import Command, Conversation, apply_set, parse_command
from llm.core.sampling import Sampling
from llm.core.sampling import generate as run_generate
from llm.errors import UserError
from llm.generate import load_model

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


# ------------------------------------------------------------------------------------------------ the context


def words(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in chat format: 1 token per word plus 1 per message, and 1 for the generation prompt."""
    return [0] * (sum(len(m["content"].split()) + 1 for m in messages) + 1)


def test_context_drops_the_oldest_turns_keeps_the_system_message_and_says_so_once():
    conv = Conversation(words, max_seq_len=20, system="be brief")  # system: 3 tokens
    ids, notice = conv.prompt("one two", max_new_tokens=4)
    assert (len(ids), notice) == (3 + 3 + 1, None)
    conv.add("one two", "three four")  # the turn: 3 + 3 tokens
    assert conv.prompt("a b", 4) == ([0] * 13, None)  # 3 + 6 + 3 + 1 <= 16: all kept
    conv.add("a b", "c d")
    ids, notice = conv.prompt("x y", 4)  # 3 + 6 + 6 + 3 + 1 = 19 > 16: the first turn goes
    assert len(ids) == 13 and notice == "(older turns dropped to stay within the 20-token context)"
    assert conv.turns == [("a b", "c d")] and conv.messages("x y")[0] == {"role": "system", "content": "be brief"}
    conv.add("x y", "z")
    ids, notice = conv.prompt("p q", 4)  # dropped again, not said again
    assert notice is None and conv.turns == [("x y", "z")] and conv.dropped == 2

    conv.reset()
    assert conv.turns == [] and conv.system == "be brief"


def test_a_message_that_cannot_fit_is_an_error_and_drops_nothing():
    conv = Conversation(words, max_seq_len=20, system="be brief")
    conv.add("one", "two")
    with pytest.raises(UserError, match=r"with the system message: with max_new_tokens=10 it does not fit the 20"):
        conv.prompt("a b c d e f g h", max_new_tokens=10)  # 3 + 9 + 1 = 13 > 10
    assert conv.turns == [("one", "two")] and conv.dropped == 0
    conv.system = None
    ids, _ = conv.prompt("a b c d e f", 10)  # 7 + 1 fits once the system message is gone; the turn (4) does not
    assert len(ids) == 8 and conv.turns == []


# ------------------------------------------------------------------------------------------------ commands


@pytest.mark.parametrize(
    "line, command",
    [
        ("", Command("empty")),
        ("   ", Command("empty")),
        ("Hello there ", Command("message", "Hello there")),
        ("//reset is a word", Command("message", "/reset is a word")),
        ("/help", Command("help")),
        ("/reset", Command("reset")),
        ("/exit", Command("exit")),
        ("/quit", Command("exit")),
        ("/system Be brief. ", Command("system", "Be brief.")),
        ("/system", Command("system", "")),
        ("/set", Command("set")),
        ("/set temperature=0.7 top_k=null", Command("set", pairs={"temperature": "0.7", "top_k": "null"})),
    ],
)
def test_parse_command(line, command):
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "line, message",
    [
        ("/foo", "unknown command /foo"),
        ("/set temperature", "/set takes KEY=VALUE, got 'temperature'"),
        ("/set temprature=1", "unknown setting 'temprature'"),
        ("/reset now", "/reset takes no argument"),
    ],
)
def test_parse_command_errors(line, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_command(line)


def test_apply_set_converts_checks_and_names_the_setting():
    base = Sampling(max_new_tokens=32, temperature=0.8, top_k=50)
    new = apply_set(base, {"temperature": "0.7", "top_k": "null", "seed": "3"}, max_seq_len=64)
    assert new == Sampling(max_new_tokens=32, temperature=0.7, top_k=None, seed=3)
    assert apply_set(base, {"max_new_tokens": "null"}, 64).max_new_tokens == 32  # half the context
    assert apply_set(base, {"max_new_tokens": None, "top_p": 0.9}, 100) == Sampling(50, 0.8, 50, 0.9)  # CLI values
    for pairs, message in [
        ({"temperature": "-1"}, "temperature=-1.0 must be >= 0"),
        ({"temperature": "null"}, "temperature=null"),
        ({"temperature": "nan"}, "must be finite"),
        ({"top_k": "0.5"}, "top_k='0.5' is not an integer"),
        ({"top_p": "2"}, "top_p=2.0 must be in (0, 1]"),
        ({"max_new_tokens": "64"}, "max_new_tokens=64 must be below the model's 64-token context"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            apply_set(base, pairs, 64)


# ------------------------------------------------------------------------------------------------ in process


def test_repl_keeps_a_reply_stopped_by_ctrl_c_and_goes_on(chat_checkpoint, monkeypatch):
    loaded = load_model(chat_checkpoint)

    seeds = []

    class Interrupted:  # a generation interrupted after two tokens
        def __init__(self, model, prompts, sampling, **kwargs):
            self.finish_reason = [None]
            seeds.append(sampling.seed)

        def __iter__(self):
            yield {0: loaded.encode("Hello")[0]}
            yield {0: loaded.encode(" world")[0]}
            raise KeyboardInterrupt

    monkeypatch.setattr(chat, "Generation", Interrupted)
    out = io.StringIO()
    session = chat.Chat(loaded, Sampling(8), system=None, out=out)
    lines = iter(["hi", "/bogus", KeyboardInterrupt, "/set seed=5", "a", "b", "/exit"])

    def read(prompt: str) -> str:
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    assert chat.repl(session, read) == 0
    reply = loaded.tokenizer.decode([loaded.encode("Hello")[0], loaded.encode(" world")[0]])
    assert session.conversation.turns == [("hi", reply), ("a", reply), ("b", reply)]  # kept as seen
    assert out.getvalue().startswith(f"{reply}\n\n(Ctrl-D or /exit leaves)\n(temperature=0.0 ")
    assert seeds == [None, 5, 6]  # from /set seed=S on, reply n samples with S + n


def test_bad_arguments_are_one_line_and_exit_2(chat_checkpoint, capsys):
    for bad, message in [
        (["temperature=0"], "ckpt_path=CKPT is required"),
        ([f"ckpt_path={chat_checkpoint}", "temprature=1"], "unknown argument(s): temprature"),
        ([f"ckpt_path={chat_checkpoint}", "top_k=many"], "top_k='many' is not an integer"),
        ([f"ckpt_path={chat_checkpoint}", "temperature=-1"], "temperature=-1.0 must be >= 0"),
        ([f"ckpt_path={chat_checkpoint}", "max_new_tokens=100000"], "max_new_tokens=100000 must be below"),
        ([f"ckpt_path={chat_checkpoint.parent / 'nope.ckpt'}"], "nope.ckpt"),
        ([f"ckpt_path={chat_checkpoint}", "allow_unsafe_checkpoint=maybe"], "must be true or false"),
    ]:
        assert chat.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    # the real command, once
    run = subprocess.run([sys.executable, "-m", "llm.chat", "oops"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: arguments are key=value, got 'oops'") and run.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ in a terminal


class Terminal:
    """``python -m llm.chat`` in a pseudo-terminal, read as text (escape sequences and carriage returns removed)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "llm.chat", *args],
            cwd=str(ROOT),
            env=env,
            encoding="utf-8",
            timeout=120,
            dimensions=(50, 1000),
        )
        self.transcript = ""

    def until(self, pattern: str) -> str:
        """The text before ``pattern`` (a regex on the raw output)."""
        self.child.expect(pattern)
        text = ANSI.sub("", self.child.before + self.child.after).replace("\r\n", "\n").replace("\r", "")
        self.transcript += text
        return ANSI.sub("", self.child.before).replace("\r\n", "\n").replace("\r", "")

    def prompt(self) -> str:
        return self.until(r"\r\n(\x1b\[[0-9;?]*[A-Za-z])*>>> ")

    def send(self, line: str) -> str:
        """What ``line`` printed, its echo excluded, up to the next prompt."""
        self.child.sendline(line)
        out = self.prompt()
        echo, _, rest = out.partition("\n")
        assert echo.endswith(line), out
        return rest

    def reply(self, line: str) -> str:
        return re.sub(r"\n\(reply cut at max_new_tokens=\d+\)$", "", self.send(line))


def expected(loaded, ids: list[int], n: int, **sampling) -> str:
    """What the chat should print: generate's tokens (greedy by default), decoded, cut at the chat's stop string."""
    text = loaded.tokenizer.decode(run_generate(loaded.model, [ids], n, eos_id=loaded.ids["eos_ids"], **sampling)[0])
    stop = loaded.chat.ours.parts("user")[0].strip() if loaded.chat is not None else None
    return text.split(stop)[0] if stop else text


SYSTEM = "You are brief."


@pytest.fixture(scope="module")
def terminals(chat_checkpoint):
    """The chat and the base model started together: they load (seconds each) at the same time."""
    base = chat_checkpoint.parents[2] / "pretrain" / "checkpoints" / "last.ckpt"
    started = {
        "chat": Terminal(f"ckpt_path={chat_checkpoint}", "temperature=0", "max_new_tokens=8", f"system={SYSTEM}"),
        "base": Terminal(f"ckpt_path={base}", "temperature=0", "max_new_tokens=8", "system=ignored"),
    }
    yield started
    for term in started.values():
        term.child.close(force=True)


def test_chat_in_a_terminal(chat_checkpoint, terminals):
    loaded = load_model(chat_checkpoint)
    context = loaded.model.cfg.max_seq_len
    system, user = SYSTEM, "Who is Emma?"

    term = terminals["chat"]
    banner = term.prompt()
    assert f"context {context} tokens, chat template: yes" in banner and "/help" in banner and "/set" in banner
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    first = term.reply(user)
    assert first == expected(loaded, loaded.chat.prompt(messages), 8)

    assert "temperature=0.7 top_k=50 top_p=null max_new_tokens=8 seed=1" in term.send("/set temperature=0.7 seed=1")
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
    sampled = term.reply("Tell me more.")  # a second turn, sampled: the same seed gives generate's tokens
    assert sampled == expected(loaded, loaded.chat.prompt(messages), 8, temperature=0.7, top_k=50, seed=1)
    assert term.send("/set temperature=-1") == "error: temperature=-1.0 must be >= 0 (0 is greedy)"
    assert term.send("/set temperature=0").startswith("(temperature=0.0 ")
    assert term.send("/bogus").startswith("error: unknown command /bogus")
    assert "/system TEXT" in term.send("/help")

    # /system and /reset change the prompt; a second turn has the first in its prompt
    assert term.send("/system Answer in one word.") == "(system message set)"
    assert term.send("/reset") == "(conversation cleared)"
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": user}]
    answer = term.reply(user)
    assert answer == expected(loaded, loaded.chat.prompt(messages), 8)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And Harriet?"}]
    assert term.reply("And Harriet?") == expected(loaded, loaded.chat.prompt(messages), 8)

    # a long conversation: messages of about 2/5 of the context drop older turns from the third on, said once
    term.send("/reset")
    long = " ".join(["Emma Woodhouse, handsome, clever, and rich,"] * 40)
    alone = len(
        loaded.chat.prompt([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": ""}])
    )
    size = len(loaded.chat.prompt([{"role": "user", "content": long}])) - len(
        loaded.chat.prompt([{"role": "user", "content": ""}])
    )
    n_words = int(len(long.split()) * (context - 8 - alone) * 0.4 / size)
    message = " ".join(long.split()[:n_words])
    notice = f"(older turns dropped to stay within the {context}-token context)"
    said = [term.send(message).count(notice) for _ in range(4)]
    assert said == [0, 0, 1, 0], said

    # Ctrl-C during (or, if it was quick, after) a long reply: back at the prompt, the chat goes on
    term.send("/reset")
    term.send("/system")
    question = "Tell me everything about Emma."
    room = context - len(loaded.chat.prompt([{"role": "user", "content": question}]))
    term.send(f"/set max_new_tokens={room}")
    term.child.sendline(question)
    term.child.send("\x03")
    term.prompt()
    assert "max_new_tokens=" in term.send("/set") and term.child.isalive()

    term.child.sendeof()
    term.child.expect(pexpect.EOF)
    assert term.child.wait() == 0, term.transcript


def test_base_model_continues_plain_text_in_a_terminal(chat_checkpoint, terminals):
    loaded = load_model(chat_checkpoint.parents[2] / "pretrain" / "checkpoints" / "last.ckpt")
    assert loaded.chat is None
    term = terminals["base"]
    banner = term.prompt()
    assert "chat template: none" in banner and "continued as plain text" in banner
    assert "(system= is ignored" in banner
    continued = expected(loaded, loaded.encode("It is a truth"), 8)
    assert term.reply("It is a truth") == continued
    assert term.reply("It is a truth") == continued  # no history: the same text again
    assert term.send("/system Be brief.").startswith("error: a base model has no chat template")
    term.child.sendeof()
    term.child.expect(pexpect.EOF)
    assert term.child.wait() == 0, term.transcript
