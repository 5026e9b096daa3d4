"""The classification DataModule: label discovery, batches, truncation, errors; the embedded set is reproducible."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from datamodules.classify import EMBEDDED_CLASSIFY, ClassifyDataModule
from datamodules.sources import CORPORA, DataError
from datamodules.tokenizer import train_tokenizer

ROWS = [
    {"text": "What a lovely day it is, said Emma.", "label": "pos"},
    {"text": "A dreadful, tiresome evening.", "label": "neg"},
    {"text": "Nothing could be more delightful.", "label": "pos"},
    {"text": "The rain spoiled everything.", "label": "neg"},
    {"text": "It was a perfectly ordinary morning.", "label": "neutral"},
] * 4


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([r["text"] for r in ROWS] * 5, vocab_size=300).save(str(path))
    return path


def make_dm(tmp_path, rows, **kw) -> ClassifyDataModule:
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    dm = ClassifyDataModule(paths=[str(src)], **{"val_fraction": 0.2, "vocab_size": 300, "batch_size": 4, **kw})
    dm.prepare()
    return dm


def test_labels_discovered_sorted_and_batched(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, ROWS, tokenizer=str(tokenizer_path))
    assert dm.labels == ["neg", "neutral", "pos"]
    assert dm.report["train"]["examples"] == 16 and dm.report["val"]["examples"] == 4
    assert sum(dm.report["train"]["labels"].values()) == 16
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "lengths", "labels"}
    for i, n in enumerate(batch["lengths"].tolist()):
        ids = batch["input_ids"][i]
        assert ids[0] == dm.bos_id and ids[n - 1] == dm.eos_id and (ids[n:] == dm.pad_id).all()
        text = dm.tokenizer.decode(ids[1 : n - 1].tolist())
        row = next(r for r in ROWS if r["text"] == text)
        assert dm.labels[int(batch["labels"][i])] == row["label"]


def test_numbers_are_labels_and_a_tokenizer_is_trained(tmp_path):
    rows = [{"text": r["text"], "label": {"pos": 1, "neg": 0, "neutral": 2}[r["label"]]} for r in ROWS]
    dm = make_dm(tmp_path, rows)
    assert dm.labels == ["0", "1", "2"]
    assert dm.report["tokenizer"]["source"] == "trained on the train split"


def test_truncation_keeps_bos_and_eos(tmp_path, tokenizer_path):
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}] * 3
    dm = make_dm(tmp_path, rows, tokenizer=str(tokenizer_path), seq_len=8, val_fraction=0.5)
    assert dm.report["train"]["truncated"] + dm.report["val"]["truncated"] == 3
    for ids, _ in (dm.train_dataset[i] for i in range(len(dm.train_dataset))):
        assert len(ids) <= 8 and ids[0] == dm.bos_id and ids[-1] == dm.eos_id


def test_given_labels_reject_unknown(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match=r"data.jsonl:5: label 'neutral' is not one of the model's labels"):
        make_dm(tmp_path, ROWS, tokenizer=str(tokenizer_path), labels=["neg", "pos"])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"text": "Hi"}, r"data.jsonl:3: no field data.label_field='label' \(keys: 'text'\)"),
        ({"text": "Hi", "label": None}, "data.jsonl:3: data.label_field='label' is None, not a label"),
        ({"review": "Hi", "label": "pos"}, r"no field data.text_field='text' \(keys: 'review', 'label'\)"),
        ({"text": " ", "label": "pos"}, "data.jsonl:3: empty text .*skip_empty=true"),
    ],
)
def test_bad_rows(tmp_path, tokenizer_path, row, match):
    with pytest.raises(DataError, match=match):
        make_dm(tmp_path, [*ROWS[:2], row, *ROWS], tokenizer=str(tokenizer_path))


def test_one_label_is_not_a_classification(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match="only one label"):
        make_dm(tmp_path, [{"text": "a b", "label": "x"}] * 5, tokenizer=str(tokenizer_path))


def test_val_paths(tmp_path, tokenizer_path):
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:3])
    dm = make_dm(tmp_path, ROWS, tokenizer=str(tokenizer_path), val_paths=[str(val)])
    assert dm.report["val"]["examples"] == 3 and dm.report["train"]["examples"] == len(ROWS)
    assert dm.report["val_split"] == "data.val_paths"


def test_embedded_set_is_what_the_script_builds():
    """datamodules/corpora/build_examples.py regenerates both embedded sets row for row."""
    spec = importlib.util.spec_from_file_location("build_examples", CORPORA / "build_examples.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for path, rows in script.build().items():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == rows, path.name
    with gzip.open(EMBEDDED_CLASSIFY, "rt", encoding="utf-8") as f:
        labels = [json.loads(line)["label"] for line in f]
    assert len(set(labels)) == 6 and len(labels) == 6 * script.CLASSIFY_PER_NOVEL


def test_utf16_gzip_file_is_decoded_and_a_binary_one_skipped(tmp_path, tokenizer_path):
    """Classification rows are read by the corpus reader too: encodings, .gz, files that are not text."""
    (tmp_path / "in").mkdir()
    body = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(body.encode("utf-16")))
    (tmp_path / "in" / "b.jsonl").write_bytes(b"\x00" * 64)
    dm = ClassifyDataModule(paths=[str(tmp_path / "in")], tokenizer=str(tokenizer_path), val_fraction=0.2)
    dm.prepare()
    reference = make_dm(tmp_path, ROWS, tokenizer=str(tokenizer_path))
    assert dm.labels == reference.labels and dm.report["rows"] == len(ROWS)
    assert [ids.tolist() for ids in dm.train_dataset.ids] == [ids.tolist() for ids in reference.train_dataset.ids]
    assert dm.report["skipped_files"] == [
        {"path": str(tmp_path / "in" / "b.jsonl"), "reason": "binary file (NUL bytes)"}
    ]
