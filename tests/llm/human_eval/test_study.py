"""Building a study: prompt rows in three forms, both answers generated in batches (as if one at a time), the
chat format or plain text, references as B, the checkpoints identified, and bad input refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.sft import SFTDataModule
from llm.errors import UserError
from llm.generate import load_model
from llm.human_eval.__main__ import main
from llm.human_eval.prompts import item_ids, prompt_of, read_prompts
from llm.human_eval.study import Study, answer_budget, batches

ROOT = Path(__file__).resolve().parents[3]
ROWS = [
    {"prompt": "It is a truth universally acknowledged"},
    {
        "instruction": "Which novel is this passage from?",
        "input": "Mr. Darcy bowed.",
        "response": "Pride and Prejudice",
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Who is Emma?"},
            {"role": "assistant", "content": "Emma Woodhouse."},
        ]
    },
    {"messages": [{"role": "user", "content": "Tell me about Bath."}]},
    {"prompt": "She was", "response": "a lady"},
    {"prompt": "It is a truth universally acknowledged"},  # a repeat: its own id
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoints(chat_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The chat model, a copy of it under another name, and the base model it was finetuned from."""
    root = tmp_path_factory.mktemp("ckpts")
    copy = root / "copy.ckpt"
    shutil.copyfile(chat_checkpoint, copy)
    base = chat_checkpoint.parents[2] / "pretrain" / "checkpoints" / "last.ckpt"
    return {"chat": chat_checkpoint, "copy": copy, "base": base}


def new(study_dir: Path, a: Path, b: Path | str, prompts: Path, *extra: str) -> Study:
    argv = ["new", str(study_dir), "--a", str(a), "--b", str(b), "--prompts", str(prompts), "--max-new-tokens", "12"]
    assert main([*argv, *extra]) == 0
    return Study.load(study_dir)


def test_prompt_rows_read_as_finetuning_reads_them():
    sft = SFTDataModule()
    for i, row in enumerate(ROWS[1:3]):  # the rows with an answer: the same conversation as in training
        read = sft._read(f"f:{i}", row)
        prompt = prompt_of(f"f:{i}", row)
        assert prompt.messages == read.messages[:-1] and prompt.reference == read.messages[-1]["content"]
    assert prompt_of("f:1", ROWS[0]).messages == [{"role": "user", "content": ROWS[0]["prompt"]}]
    assert prompt_of("f:1", ROWS[0]).reference is None and prompt_of("f:1", ROWS[3]).reference is None
    assert prompt_of("f:1", ROWS[2]).display == "[system]\nAnswer briefly.\n\n[user]\nWho is Emma?"
    assert prompt_of("f:1", ROWS[1]).text == "Which novel is this passage from?\n\nMr. Darcy bowed."
    for row, message in [
        ({"text": "x"}, "needs 'prompt', 'instruction' or 'messages'"),
        ({"prompt": " "}, "empty 'prompt'"),
        ({"prompt": 3}, "not a string"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "message 0 must be an object"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "nothing before its assistant message"),
    ]:
        with pytest.raises(UserError, match=message):
            prompt_of("f.jsonl:7", row)


def test_ids_are_stable_and_distinct(tmp_path):
    prompts = read_prompts(write_rows(tmp_path / "p.jsonl", ROWS))
    ids = item_ids(prompts)
    assert len(set(ids)) == len(ids) and ids[5] == ids[0] + "-2"
    assert item_ids(prompts[::-1])[::-1][1:5] == ids[1:5]  # another order: the same ids


def test_batches_fit_the_context():
    lengths, budgets = [5, 60, 10, 30, 7], [16, 4, 16, 16, 16]
    groups = batches(lengths, budgets, 64, batch_size=2)
    assert sorted(r for g in groups for r in g) == list(range(5)) and all(len(g) <= 2 for g in groups)
    assert all(max(lengths[r] for r in g) + max(budgets[r] for r in g) <= 64 for g in groups)
    assert answer_budget(10, 16, 64) == 16 and answer_budget(60, 16, 64) == 16 and answer_budget(56, 16, 64) == 16
    assert answer_budget(40, 32, 64) == 24  # the rest of the context, at least a quarter of it


def test_new_study_of_two_checkpoints(checkpoints, tmp_path):
    prompts = write_rows(tmp_path / "prompts.jsonl", ROWS)
    study = new(tmp_path / "s1", checkpoints["chat"], checkpoints["base"], prompts)
    items = list(study.items.values())
    assert [i["id"] for i in items] == item_ids(read_prompts(prompts)) and len(items) == len(ROWS)
    meta = study.meta
    for side, path in [("a", checkpoints["chat"]), ("b", checkpoints["base"])]:
        assert meta[side]["path"] == str(path.resolve()) and meta[side]["bytes"] == path.stat().st_size
        assert meta[side]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["a"]["chat_format"] is True and meta["b"]["chat_format"] is False
    assert meta["settings"]["max_new_tokens"] == 12 and meta["settings"]["decoding"] == "greedy"
    assert meta["prompts"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest() and meta["secret"]

    chat, base = load_model(checkpoints["chat"]), load_model(checkpoints["base"])
    for item, row in zip(items, read_prompts(prompts)):
        # A answered in the chat format it was finetuned on, B (a base model) continued the plain text
        assert item["generation"]["a"]["prompt_tokens"] == len(chat.chat.prompt(row.messages))
        assert item["generation"]["b"]["prompt_tokens"] == len(base.encode(row.text))
        assert item["prompt"] == row.display and item["messages"] == row.messages
        for side in "ab":
            assert 0 < item["generation"][side]["tokens"] <= 12 and isinstance(item[side], str)
    assert (study.root / "items.jsonl").read_text().count("\n") == len(ROWS)

    # the copy is the same model: the same answers, another identity (path); batched answers equal unbatched ones
    one_by_one = new(tmp_path / "s2", checkpoints["copy"], checkpoints["chat"], prompts, "--batch-size", "1")
    assert one_by_one.meta["a"]["path"] != meta["a"]["path"] and one_by_one.meta["a"]["sha256"] == meta["a"]["sha256"]
    for item in items:
        again = one_by_one.items[item["id"]]
        assert again["a"] == again["b"] == item["a"]


def test_references_as_b_and_sampling_independent_of_batches(checkpoints, tmp_path):
    rows = [r for r in ROWS if "response" in r or "messages" in r and r["messages"][-1]["role"] == "assistant"]
    prompts = write_rows(tmp_path / "prompts.jsonl", rows)
    study = new(tmp_path / "refs", checkpoints["chat"], "references", prompts)
    assert study.meta["b"]["kind"] == "references"
    assert [i["b"] for i in study.items.values()] == ["Pride and Prejudice", "Emma Woodhouse.", "a lady"]
    assert all(i["generation"]["b"] is None for i in study.items.values())

    sampled = ["--temperature", "1.5", "--seed", "7"]
    one = new(tmp_path / "t1", checkpoints["chat"], "references", prompts, *sampled, "--batch-size", "1")
    three = new(tmp_path / "t3", checkpoints["chat"], "references", prompts, *sampled, "--batch-size", "3")
    assert [i["a"] for i in one.items.values()] == [i["a"] for i in three.items.values()]
    assert one.meta["settings"]["decoding"] == "sampled" and one.meta["settings"]["seed"] == 7


def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys):
    prompts = write_rows(tmp_path / "prompts.jsonl", ROWS)
    bad_row = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"text": "x"}])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "ratings.jsonl").write_text("")
    chat = str(checkpoints["chat"])
    cases = [
        (["new", str(tmp_path / "s"), "--a", chat, "--b", "references", "--prompts", str(prompts)], "has no reference"),
        (["new", str(tmp_path / "s"), "--a", chat, "--b", chat, "--prompts", str(tmp_path / "no.jsonl")], "no such file"),
        (["new", str(tmp_path / "s"), "--a", chat, "--b", chat, "--prompts", str(bad_row)], "bad.jsonl:2: a row needs"),
        (["new", str(tmp_path / "full"), "--a", chat, "--b", chat, "--prompts", str(prompts)], "not empty"),
        (["new", str(tmp_path / "s"), "--a", "nope.ckpt", "--b", chat, "--prompts", str(prompts)], "--a nope.ckpt"),
        (["new", str(tmp_path / "s"), "--a", chat, "--b", chat, "--prompts", str(prompts), "--temperature", "-1"], "temperature"),
        (["new", str(tmp_path / "s"), "--a", chat, "--prompts", str(prompts)], "--b"),
        (["new", str(tmp_path / "s"), "--a", chat, "--b", chat, "--prompts", str(prompts), "--max-new-tokens", "x"], "invalid int"),
        (["summary", str(tmp_path / "nothing")], "not a study"),
        (["frobnicate"], "invalid choice"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()
    proc = subprocess.run(  # the real command: no traceback, no usage block
        [sys.executable, "-m", "llm.human_eval", "new", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_summary_writes_summary_json(tmp_path, capsys):
    from tests.llm.human_eval.conftest import make_study

    study = make_study(tmp_path / "study")

    def line(item: str, rater: str, choice: str, left: str, winner: str, score: int | None = None) -> dict:
        return {"item": item, "rater": rater, "choice": choice, "left": left, "winner": winner, "score": score}

    lines = [
        line("item-1", "ann", "left", "a", "a", score=5),
        line("item-2", "ann", "left", "b", "b"),
        line("item-1", "bob", "tie", "b", "tie"),
        line("gone", "bob", "tie", "b", "tie"),
    ]
    (study.root / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    assert main(["summary", str(study.root), "--resamples", "1000"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((study.root / "summary.json").read_text())
    assert summary["ratings"] == 3 and summary["win_rate_a"] == pytest.approx(1.5 / 3)  # an unknown item is left out
    assert summary["a"]["path"] == "/ckpt/a.ckpt" and summary["items"] == 4
    assert summary["bootstrap"]["resamples"] == 1000 and len(summary["win_rate_a_ci95"]) == 2
    assert summary["agreement"][0]["raters"] == ["ann", "bob"] and summary["per_rater"]["bob"]["tie"] == 1
    assert "A's win rate: 0.500" in out and "a tie counts as half a win" in out and "summary.json" in out
