"""Byte-level BPE: special ids, exact round trips in English and Chinese, loading and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from datamodules.sources import EMBEDDED_CORPUS, DataError, read_file
from datamodules.tokenizer import load_tokenizer, special_ids, token_bytes, train_tokenizer

SANGUO = Path(__file__).resolve().parents[1] / "data" / "sanguo_yanyi_sample.jsonl"  # six chapters, see tests/data


@pytest.fixture(scope="module")
def english() -> list[str]:
    """Paragraphs from the first part of Emma (the embedded corpus)."""
    paras = read_file(EMBEDDED_CORPUS, split_paragraphs=True)
    return [p for _, p in zip(range(600), paras)]


@pytest.fixture(scope="module")
def chinese() -> list[str]:
    """Six chapters of 三国演义."""
    if not SANGUO.is_file():
        pytest.skip(f"{SANGUO} not available")
    with open(SANGUO, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(6), f)]


@pytest.fixture(scope="module")
def en_tok(english) -> Tokenizer:
    return train_tokenizer(english[:500], vocab_size=600)


def test_special_ids_first(en_tok):
    assert special_ids(en_tok) == (0, 1, 2)
    assert [en_tok.id_to_token(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert en_tok.get_vocab_size() == 600


def test_english_round_trip_exact(en_tok, english):
    held_out = english[500:]
    for text in held_out:
        assert en_tok.decode(en_tok.encode(text).ids) == text
    # it learnt something: fewer tokens than bytes
    text = "\n\n".join(held_out)
    assert len(en_tok.encode(text).ids) < 0.5 * len(text.encode("utf-8"))


def test_any_unicode_round_trips_with_english_merges(en_tok):
    text = "  leading spaces, tabs\t\tand CRLF\r\n中文 ёжик — “quotes” 🙂👍🏽 \u200d\x00 end  "
    ids = en_tok.encode(text).ids
    assert en_tok.decode(ids) == text
    assert ids[0] == 0  # the post-processor puts BOS in front, as Llama tokenizers do
    ids = en_tok.encode(text, add_special_tokens=False).ids
    assert 0 not in ids and 1 not in ids and 2 not in ids  # special tokens never appear from text


def test_chinese_round_trip_exact(chinese):
    tok = train_tokenizer(chinese[:5], vocab_size=1000)
    for text in chinese[5:] + [chinese[0][:2000]]:
        assert tok.decode(tok.encode(text).ids) == text
    text = chinese[5]
    assert len(tok.encode(text).ids) < len(text.encode("utf-8")) / 2


def test_special_token_literal_maps_to_its_id(en_tok):
    ids = en_tok.encode("end<|eos|>").ids
    assert ids[-1] == 1


def test_sample_bytes_limits_training_text(english):
    full = train_tokenizer(english, vocab_size=2000)
    small = train_tokenizer(english, vocab_size=2000, sample_bytes=2000)
    assert small.get_vocab_size() < full.get_vocab_size()  # ran out of merges on ~2 kB


def test_vocab_size_too_small():
    with pytest.raises(DataError, match=r"data\.vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_and_load(tmp_path, en_tok):
    p = tmp_path / "tokenizer.json"
    en_tok.save(str(p))
    tok = load_tokenizer(p)
    assert tok.encode("Emma Woodhouse").ids == en_tok.encode("Emma Woodhouse").ids
    assert load_tokenizer(tmp_path).get_vocab_size() == 600  # a directory holding tokenizer.json


def test_load_missing_names_path(tmp_path):
    p = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match=f"data.tokenizer={p}: no such file"):
        load_tokenizer(p)


def test_load_invalid_names_path(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match=f"data.tokenizer={p}: not a valid tokenizer.json") as e:
        load_tokenizer(p)
    assert "\n" not in str(e.value)


def test_loaded_without_pad_uses_eos(tmp_path):
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2}, unk_token="hello"))
    tok.add_special_tokens(["<s>", "</s>"])
    p = tmp_path / "t.json"
    tok.save(str(p))
    assert special_ids(load_tokenizer(p)) == (0, 1, 1)


def test_loaded_without_eos_is_an_error(tmp_path):
    tok = Tokenizer(models.WordLevel({"hello": 0}, unk_token="hello"))
    p = tmp_path / "t.json"
    tok.save(str(p))
    with pytest.raises(DataError, match="no end-of-sequence token"):
        load_tokenizer(p)


def test_hugging_face_model_directory(tmp_path, english):
    """``data.tokenizer`` may name a Hugging Face model directory: its tokenizer.json is used, Llama's
    ``<s>``/``</s>`` serve as BOS/EOS (no pad token: EOS pads)."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(english[:200], trainer=trainer)
    hf_dir = tmp_path / "hf-model"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 400}))
    loaded = load_tokenizer(hf_dir)
    assert special_ids(loaded) == (1, 2, 2)
    text = "Emma Woodhouse 中文 🙂"
    assert loaded.decode(loaded.encode(text).ids) == text


def test_directory_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=rf"data\.tokenizer={tmp_path}: the directory has no tokenizer\.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_token_bytes_add_up_to_the_text(en_tok, english, chinese):
    """Bits per byte's denominator: a text's tokens (BOS included) stand for exactly its UTF-8 bytes."""
    table = token_bytes(en_tok)
    assert table.shape == (en_tok.get_vocab_size(),) and table[:3].tolist() == [0, 0, 0]  # special tokens: no text
    mixed = "  leading spaces, tabs\t\tand CRLF\r\n中文 ёжик — “quotes” 🙂👍🏽 \u200d end  "
    for text in [*english[500:520], chinese[0], mixed]:  # English merges; Chinese and emoji split inside characters
        ids = en_tok.encode(text).ids
        assert table[ids].sum() == len(text.encode("utf-8"))


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    tok = Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "<0x0A>": 2, "\u2581the": 3, "é": 4}, merges=[]))
    tok.add_special_tokens(["<s>", "</s>"])
    assert token_bytes(tok).tolist() == [0, 0, 1, 4, 2]  # byte fallback: 1; "▁the": " the"; "é": 2 bytes
