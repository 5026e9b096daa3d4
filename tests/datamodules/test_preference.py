"""The preference DataModule: both row forms, labels on the answers only, one padded length, truncation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.preference import EMBEDDED_PREFERENCE, PreferenceDataModule
from datamodules.sources import DataError
from datamodules.tokenizer import BOS, EOS, train_tokenizer

TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.",
    "Say hello. Hello there, my dear friend. Which novel is this from? Emma, Persuasion, Mansfield Park.",
] * 20
PROMPT = [{"role": "user", "content": "Which novel?"}]
TEXT_ROW = {"prompt": "Say hello.", "chosen": " Hello there. ", "rejected": "Go away, sir."}
CHAT_ROW = {  # TRL's conversational form: the shared messages are the prompt
    "chosen": [*PROMPT, {"role": "assistant", "content": "Emma."}, {"role": "user", "content": "Year?"},
               {"role": "assistant", "content": "1815."}],
    "rejected": [*PROMPT, {"role": "assistant", "content": "Emma."}, {"role": "user", "content": "Year?"},
                 {"role": "assistant", "content": "1811, I think."}],
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXT, vocab_size=300).save(str(path))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_dm(tmp_path: Path, tokenizer_path: Path, rows: list, **kw) -> PreferenceDataModule:
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:1])
    args = {"paths": [str(src)], "val_paths": [str(val)], "tokenizer": str(tokenizer_path), "seq_len": 128}
    dm = PreferenceDataModule(**{**args, **kw})
    dm.prepare()
    return dm


def labelled(dm: PreferenceDataModule, ids: torch.Tensor, labels: torch.Tensor) -> str:
    return dm.tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=False)


def test_text_rows_label_the_answers_only(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, [TEXT_ROW])
    tok = dm.tokenizer
    prompt = tok.encode(f"{BOS}<|user|>\nSay hello.\n<|assistant|>\n", add_special_tokens=False).ids
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "input_ids", "labels"}
    assert torch.equal(batch["input_ids"], torch.cat([batch["chosen_ids"], batch["rejected_ids"]]))  # chosen first
    assert torch.equal(batch["labels"], torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    for side, answer in (("chosen", "Hello there."), ("rejected", "Go away, sir.")):
        ids = [*prompt, *tok.encode(answer, add_special_tokens=False).ids, dm.eos_id]
        n = len(ids) - 1
        assert batch[f"{side}_ids"][0, :n].tolist() == ids[:-1]
        assert batch[f"{side}_labels"][0, :n].tolist() == [-100] * (len(prompt) - 1) + ids[len(prompt) :]
        assert labelled(dm, batch[f"{side}_ids"], batch[f"{side}_labels"]) == f"{answer}{EOS}"
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape  # one T for both sides: one forward
    assert dm.report["train"]["forms"] == {"text": 1, "conversation": 0}


def test_conversation_rows_share_the_prompt_and_label_the_last_answer(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, [CHAT_ROW], seq_len=256)
    batch = next(iter(dm.train_dataloader()))
    # the earlier assistant turn ("Emma.") is the prompt's: context, not labelled
    assert labelled(dm, batch["chosen_ids"], batch["chosen_labels"]) == f"1815.{EOS}"
    assert labelled(dm, batch["rejected_ids"], batch["rejected_labels"]) == f"1811, I think.{EOS}"
    example = dm.train_dataset[0]
    start = int(example.chosen.trained.argmax())
    assert example.chosen.ids[:start].tolist() == example.rejected.ids[:start].tolist()
    text = dm.tokenizer.decode(example.chosen.ids[:start].tolist(), skip_special_tokens=False)
    assert text == f"{BOS}<|user|>\nWhich novel?\n<|assistant|>\nEmma.{EOS}\n<|user|>\nYear?\n<|assistant|>\n"
    assert dm.report["train"]["forms"] == {"text": 0, "conversation": 1}


def test_prompt_apart_as_messages_and_answers_as_messages(tmp_path, tokenizer_path):
    """{"messages": prompt, ...} and TRL's explicit prompt ("chosen": [one assistant message]) mean the same pair."""
    as_text = make_dm(tmp_path, tokenizer_path, [{"prompt": "Which novel?", "chosen": "Emma.", "rejected": "Emma!"}])
    rows = [
        {"messages": PROMPT, "chosen": "Emma.", "rejected": "Emma!"},
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Emma."}],
         "rejected": [{"role": "assistant", "content": "Emma!"}]},
        {"chosen": [*PROMPT, {"role": "assistant", "content": "Emma."}],
         "rejected": [*PROMPT, {"role": "assistant", "content": "Emma!"}]},
    ]  # fmt: skip
    for row in rows:
        dm = make_dm(tmp_path, tokenizer_path, [row])
        for side in ("chosen", "rejected"):
            got, expected = getattr(dm.train_dataset[0], side), getattr(as_text.train_dataset[0], side)
            assert got.ids.tolist() == expected.ids.tolist() and got.trained.tolist() == expected.trained.tolist()


def test_field_names_are_configurable(tmp_path, tokenizer_path):
    row = {"question": "Say hello.", "good": "Hello there.", "bad": "No."}
    dm = make_dm(tmp_path, tokenizer_path, [row], prompt_field="question", chosen_field="good", rejected_field="bad")
    assert dm.report["train"]["examples"] == 1


def test_truncation_is_counted_and_a_prompt_too_long_dropped(tmp_path, tokenizer_path):
    long = "Hello there, my dear friend. " * 20
    rows = [
        TEXT_ROW,
        {"prompt": "Say hello.", "chosen": long, "rejected": "No."},  # one side truncated
        {"prompt": long * 3, "chosen": "Hello.", "rejected": "No."},  # the prompt alone fills seq_len
    ]
    dm = make_dm(tmp_path, tokenizer_path, rows, seq_len=48, batch_size=3)
    report = dm.report["train"]
    assert report["examples"] == 2 and report["dropped_prompt_too_long"] == 1
    assert report["truncated"] == 3  # the long answer, and both sides of the long prompt
    assert report["dropped_examples"] == [f"{tmp_path / 'train.jsonl'}:3"]
    batch = dm.train_dataloader().collate_fn(dm.train_dataset.examples)
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (2, 48)
    short = dm.train_dataset[0].rejected  # TEXT_ROW's rejected side: padded
    n = len(short.ids) - 1
    assert (batch["rejected_ids"][0, n:] == dm.pad_id).all() and (batch["rejected_labels"][0, n:] == -100).all()

    same = {"prompt": "Say hello.", "chosen": f"{long} Yes.", "rejected": f"{long} No."}  # cut before they differ
    dm = make_dm(tmp_path, tokenizer_path, [TEXT_ROW, same], seq_len=48)
    assert dm.report["train"]["dropped_same_when_truncated"] == 1 and dm.report["train"]["examples"] == 1


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "Hi", "chosen": "Hello"}, r"no field data.rejected_field='rejected' \(keys: 'prompt', 'chosen'\)"),
        ({"chosen": "Hello", "rejected": "No"}, r"no prompt: neither data.prompt_field='prompt'"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "No"}, r"data.chosen_field='chosen' must be a string or one"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": "  "}, r"empty rejected answer.*skip_empty"),
        ({"prompt": " ", "chosen": "Hello", "rejected": "No"}, r"empty prompt \(data.prompt_field='prompt'\)"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello "}, r"chosen and rejected answers are the same"),
        ({"prompt": 5, "chosen": "Hello", "rejected": "No"}, r"data.prompt_field='prompt' is int"),
        (
            {"messages": [{"from": "human", "value": "Hi"}], "chosen": "a", "rejected": "b"},
            r"data.messages_field='messages' message 0 must be an object with string 'role'",
        ),
        (
            {"chosen": [*PROMPT, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
             "rejected": [*PROMPT, {"role": "assistant", "content": "c"}]},
            r"data.chosen_field='chosen' must end in one 'assistant' message after the 1 messages both answers share",
        ),
        (
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "a"}]},
            r"after the 0 messages both answers share \(got \['user', 'assistant'\]\)",
        ),
    ],
)  # fmt: skip
def test_bad_rows_name_the_line_and_field(tmp_path, tokenizer_path, row, match):
    with pytest.raises(DataError, match=match) as err:
        make_dm(tmp_path, tokenizer_path, [TEXT_ROW, row])
    assert "train.jsonl:2" in str(err.value) and "\n" not in str(err.value)


def test_skip_empty_drops_empty_and_tied_rows(tmp_path, tokenizer_path):
    rows = [
        TEXT_ROW,
        {"prompt": "Hi", "chosen": "", "rejected": "No"},
        {"prompt": "Hi", "chosen": "a", "rejected": "a"},
    ]
    dm = make_dm(tmp_path, tokenizer_path, rows, skip_empty=True)
    assert dm.report["skipped_empty"] == 2 and dm.report["train"]["examples"] == 1


def test_embedded_set(tokenizer_path):
    dm = PreferenceDataModule(tokenizer=str(tokenizer_path), seq_len=1024, batch_size=4)
    dm.prepare()
    assert dm.report["files"] == [str(EMBEDDED_PREFERENCE)] and dm.report["rows"] == 1500
    assert (
        dm.report["train"]["examples"] + dm.report["val"]["examples"] == 1500 and dm.report["train"]["truncated"] == 0
    )
    forms = dm.report["train"]["forms"]
    assert forms["text"] > 0 and forms["conversation"] > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_ids"].shape[0] == 4 and batch["chosen_ids"].shape == batch["rejected_labels"].shape
    for example in dm.train_dataset.examples[:50]:  # the two sides share their prompt and differ after it
        c, r = example.chosen, example.rejected
        start = int(c.trained.argmax())
        assert start == int(r.trained.argmax()) and c.ids[:start].tolist() == r.ids[:start].tolist()
        assert c.ids[start:].tolist() != r.ids[start:].tolist()
