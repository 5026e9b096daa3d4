"""The SFT DataModule: chat template (and its Jinja twin), the loss mask token by token, truncation, padding, errors."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

import pytest
import torch

from datamodules.sft import EMBEDDED_SFT, ChatTemplate, SFTDataModule
from datamodules.sources import DataError, read_records
from datamodules.tokenizer import BOS, EOS, train_tokenizer

TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.",
    "Say hello. Hello there, my dear friend. Which novel is this from? Emma, Persuasion, Mansfield Park.",
] * 20

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Hello."},
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXT, vocab_size=300).save(str(path))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_dm(tmp_path: Path, tokenizer_path: Path, rows: list, **kw) -> SFTDataModule:
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:1])
    args = {"paths": [str(src)], "val_paths": [str(val)], "tokenizer": str(tokenizer_path), "seq_len": 64}
    dm = SFTDataModule(**{**args, **kw})
    dm.prepare()
    return dm


def test_template_renders_like_its_jinja_version():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for template in [ChatTemplate(), ChatTemplate("### {role}:\n{content}\n\n"), ChatTemplate('[{role}] "{content}"|')]:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders it
        jinja = env.from_string(template.jinja())
        for messages in (CHAT, CHAT[1:3], [{"role": "user", "content": "  Hi  "}]):
            for gen in (False, True):
                expected = template.render(messages, BOS, EOS, add_generation_prompt=gen)
                got = jinja.render(messages=messages, bos_token=BOS, eos_token=EOS, add_generation_prompt=gen)
                assert got == expected
    assert jinja2 is not None


def test_template_needs_content_once():
    with pytest.raises(DataError, match="chat_template"):
        ChatTemplate("<|{role}|>")
    assert ChatTemplate().generation_prompt == "<|assistant|>\n"
    # the default format, as a conversation renders with it
    rendered = ChatTemplate().render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], BOS, EOS
    )
    assert rendered == f"{BOS}<|user|>\nHi\n<|assistant|>\nHello{EOS}\n"


def test_loss_mask_token_by_token(tmp_path, tokenizer_path):
    """Inputs are the whole conversation; labels are the next token on the answer and its EOS, -100 elsewhere."""
    rows = [{"instruction": "Say hello.", "input": "Politely.", "response": " Hello there. "}]
    dm = make_dm(tmp_path, tokenizer_path, rows)
    tok = dm.tokenizer
    prompt = tok.encode(f"{BOS}<|user|>\nSay hello.\n\nPolitely.\n<|assistant|>\n", add_special_tokens=False).ids
    answer = [*tok.encode("Hello there.", add_special_tokens=False).ids, dm.eos_id]
    assert prompt[0] == dm.bos_id
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"][0].tolist() == (prompt + answer)[:-1]
    assert batch["labels"][0].tolist() == [-100] * (len(prompt) - 1) + answer


def test_segments_encode_as_the_whole_text(tmp_path, tokenizer_path):
    """Pieces meet at newlines, so encoding them apart gives the tokens of the rendered text (what HF would do)."""
    dm = make_dm(tmp_path, tokenizer_path, [{"messages": CHAT}], seq_len=256)
    example = dm.train_dataset[0]
    text = dm.template.render(CHAT, BOS, EOS)
    whole = dm.tokenizer.encode(text, add_special_tokens=False).ids
    newline = dm.tokenizer.encode("\n", add_special_tokens=False).ids
    assert example.ids.tolist() + newline == whole  # the text's final newline (after EOS) is not kept


def test_chat_rows_train_every_answer(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, [{"messages": CHAT + [{"role": "user", "content": "Bye?"}]}], seq_len=256)
    example = dm.train_dataset[0]
    trained = dm.tokenizer.decode(example.ids[example.trained].tolist(), skip_special_tokens=False)
    assert trained == f"Hello there.{EOS}Hello.{EOS}"  # both answers; the trailing user turn is dropped
    val = dm.val_dataset[0]
    assert val.reference == "Hello."
    assert val.prompt_text.endswith("Again?\n<|assistant|>\n") and val.prompt_text.startswith("<|system|>")
    assert val.prompt.tolist() == example.ids[: len(val.prompt)].tolist()


def test_dynamic_padding_and_truncation(tmp_path, tokenizer_path):
    long = "Hello there, my dear friend. " * 20
    rows = [
        {"instruction": "Say hello.", "response": "Hello."},
        {"instruction": "Say hello.", "response": long},
        {"instruction": long * 3, "response": "Hello."},  # the prompt alone is longer than seq_len
    ]
    dm = make_dm(tmp_path, tokenizer_path, rows, seq_len=48, batch_size=2)
    report = dm.report["train"]
    assert report["examples"] == 2 and report["truncated"] == 2 and report["dropped_prompt_too_long"] == 1
    lengths = sorted(len(e.ids) for e in dm.train_dataset.examples)
    assert lengths[1] == 49  # seq_len inputs + the last label
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (1, len(dm.val_dataset[0].ids) - 1)  # padded to its own longest: no padding
    batch = dm.train_dataloader().collate_fn(dm.train_dataset.examples)
    assert batch["input_ids"].shape == (2, 48)
    short = min(range(2), key=lambda i: len(dm.train_dataset[i].ids))
    n = len(dm.train_dataset[short].ids) - 1
    assert (batch["input_ids"][short, n:] == dm.pad_id).all() and (batch["labels"][short, n:] == -100).all()


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            {"instruction": "Hi", "output": "Hello"},
            r"no field data.response_field='response' \(keys: 'instruction', 'output'\)",
        ),
        ({"prompt": "Hi"}, "neither data.messages_field='messages' nor data.instruction_field='instruction'"),
        ({"instruction": "Hi", "response": "  "}, "empty response.*skip_empty"),
        ({"instruction": "", "response": "Hello"}, "empty instruction"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no non-empty 'assistant' message"),
        ({"messages": [{"from": "human", "value": "Hi"}]}, "message 0 must be an object with string 'role'"),
        ({"instruction": 3, "response": "Hello"}, "is int, not a string"),
    ],
)
def test_bad_rows_name_the_line_and_field(tmp_path, tokenizer_path, row, match):
    rows = [{"instruction": "Say hello.", "response": "Hello."}, row]
    with pytest.raises(DataError, match=match) as err:
        make_dm(tmp_path, tokenizer_path, rows)
    assert "train.jsonl:2" in str(err.value) and "\n" not in str(err.value)


def test_skip_empty_counts(tmp_path, tokenizer_path):
    rows = [{"instruction": "Say hello.", "response": "Hello."}, {"instruction": "Hi", "response": ""}]
    dm = make_dm(tmp_path, tokenizer_path, rows, skip_empty=True)
    assert dm.report["skipped_empty"] == 1 and dm.report["train"]["examples"] == 1


def test_needs_a_tokenizer_and_files(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "response": "b"}] * 4)
    with pytest.raises(DataError, match="init_from=CKPT"):
        SFTDataModule(paths=[str(src)]).prepare()
    with pytest.raises(DataError, match="does not exist"):
        SFTDataModule(paths=[str(tmp_path / "missing.jsonl")]).prepare()
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"b.jsonl:2: invalid JSON"):
        list(read_records([bad]))


def test_embedded_set(tokenizer_path):
    dm = SFTDataModule(tokenizer=str(tokenizer_path), seq_len=256)
    dm.prepare()
    assert dm.report["files"] == [str(EMBEDDED_SFT)]
    forms = dm.report["train"]["forms"]
    assert forms["instruction"] > 0 and forms["chat"] > 0
    kept = [dm.report[s]["examples"] + dm.report[s]["dropped_prompt_too_long"] for s in ("train", "val")]
    assert sum(kept) == dm.report["rows"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].dtype == torch.long


# ---------------------------------------------------------------------------------------------------------
# bad input: example files go through the corpus reader (datamodules.sources), with its handling and counts

ROWS = [{"instruction": "Say hello.", "response": "Hello there."}, {"messages": CHAT}] * 3


def jsonl_bytes(rows: list, encoding: str = "utf-8") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding)


def prepared(tokenizer_path: Path, train: Path, val: Path | None = None) -> SFTDataModule:
    val_paths = None if val is None else [str(val)]
    dm = SFTDataModule(paths=[str(train)], val_paths=val_paths, tokenizer=str(tokenizer_path), seq_len=256)
    dm.prepare()
    return dm


def train_ids(dm: SFTDataModule) -> list[list[int]]:
    return [e.ids.tolist() for e in dm.train_dataset.examples]


def test_utf8_bom_file_is_read_and_counted(tmp_path, tokenizer_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(jsonl_bytes(ROWS))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(codecs.BOM_UTF8 + jsonl_bytes(ROWS).replace(b"Hello there.", b"Hello \xff there.", 1))
    val = tmp_path / "val.jsonl"
    val.write_bytes(jsonl_bytes(ROWS[:1]))
    dm = prepared(tokenizer_path, bom, val)
    assert dm.report["rows"] == len(ROWS) + 1 and dm.report["train"]["examples"] == len(ROWS)
    assert dm.report["sources"] == {
        "files": 2,
        "bytes": bom.stat().st_size + val.stat().st_size,  # the BOM's 3 bytes included, as the corpus counts
        "empty_files": 0,
        "skipped_files": 0,
    }
    assert dm.report["invalid_utf8_replacements"] == 1  # the \xff, replaced by U+FFFD and counted
    reference = prepared(tokenizer_path, plain, val)
    assert train_ids(dm)[1:] == train_ids(reference)[1:]  # the BOM is not part of the first row


def test_utf16_file_is_decoded(tmp_path, tokenizer_path):
    utf8, utf16 = tmp_path / "utf8.jsonl", tmp_path / "utf16.jsonl"
    utf8.write_bytes(jsonl_bytes(ROWS))
    utf16.write_bytes(jsonl_bytes(ROWS, "utf-16"))  # with its byte-order mark
    val = tmp_path / "val.jsonl"
    val.write_bytes(jsonl_bytes(ROWS[:1], "utf-16-le"))  # no BOM: NUL bytes, so not UTF-8 text
    assert train_ids(prepared(tokenizer_path, utf16)) == train_ids(prepared(tokenizer_path, utf8))
    with pytest.raises(DataError) as err:
        prepared(tokenizer_path, utf16, val)
    assert str(err.value) == (
        f"data.val_paths: no sft examples in {[str(val)]} (1 skipped, e.g. {val}: binary file (NUL bytes))"
    )


def test_gzip_file_is_read_and_a_truncated_one_named(tmp_path, tokenizer_path):
    plain, packed = tmp_path / "plain.jsonl", tmp_path / "rows.jsonl.gz"
    plain.write_bytes(jsonl_bytes(ROWS))
    packed.write_bytes(gzip.compress(codecs.BOM_UTF16_LE + jsonl_bytes(ROWS, "utf-16-le")))
    dm = prepared(tokenizer_path, packed)
    assert train_ids(dm) == train_ids(prepared(tokenizer_path, plain))
    assert dm.report["sources"]["bytes"] == 2 + len(jsonl_bytes(ROWS, "utf-16-le"))  # decompressed bytes
    cut = tmp_path / "cut.jsonl.gz"
    full = gzip.compress(jsonl_bytes(ROWS * 50))
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError) as err:
        prepared(tokenizer_path, cut)
    assert str(err.value) == f"{cut}: cannot be read (truncated: the compressed stream ends early)"


def test_binary_file_is_skipped_and_counted(tmp_path, tokenizer_path):
    (tmp_path / "in").mkdir()
    good, image = tmp_path / "in" / "a.jsonl", tmp_path / "in" / "b.jsonl"
    good.write_bytes(jsonl_bytes(ROWS))
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "in" / "notes.txt").write_text("not an example")
    dm = prepared(tokenizer_path, tmp_path / "in")
    assert dm.report["files"] == [str(good), str(image)] and dm.report["rows"] == len(ROWS)
    assert dm.report["skipped_files"] == [
        {"path": str(tmp_path / "in" / "notes.txt"), "reason": "unsupported file type"},
        {"path": str(image), "reason": "binary file (NUL bytes)"},
    ]
    assert dm.report["sources"]["files"] == 1 and dm.report["sources"]["skipped_files"] == 2
    with pytest.raises(DataError) as err:
        prepared(tokenizer_path, image)
    assert (
        str(err.value)
        == f"data.paths: no sft examples in {[str(image)]} (1 skipped, e.g. {image}: binary file (NUL bytes))"
    )
