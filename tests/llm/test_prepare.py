"""python -m llm.prepare: the data pipeline alone, into the cache that train.py then finds (nothing rebuilt); a
mixture trained end to end with per-source validation; bad overrides and inputs in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from datamodules.sources import EMBEDDED_CORPUS, read_file
from llm import prepare
from tests.conftest import ROOT, TINY, compose_config

SANGUO = ROOT / "tests" / "data" / "sanguo_yanyi_sample.jsonl"


def entries(cache: Path) -> dict[str, float]:
    """Every file of the cache with its modification time: what a rebuild would change."""
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prepare-inputs")
    paras = [p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True) if len(p.strip()) > 40][:600]
    pq.write_table(pa.table({"body": paras}), d / "austen.parquet", row_group_size=200)
    (d / "sanguo.jsonl.zst").write_bytes(zstandard.compress(SANGUO.read_bytes()))
    return {"austen": d / "austen.parquet", "sanguo": d / "sanguo.jsonl.zst"}


def mixture(inputs: dict[str, Path], cache: Path) -> list[str]:
    return [
        *TINY,
        "data=mixture",
        f"+data.sources.austen={{paths: [{inputs['austen']}], weight: 0.7, text_field: body}}",
        f"+data.sources.sanguo.paths=[{inputs['sanguo']}]",
        "+data.sources.sanguo.weight=0.3",
        f"data.cache_dir={cache}",
        "trainer.limit_val_batches=1.0",
        "trainer.max_steps=3",  # validations: before training, at step 3, and the final one
    ]


@pytest.mark.slow
def test_prepare_then_train_finds_the_same_entries(inputs, tmp_path, capsys):
    """prepare builds the mixture (a tokenizer and one entry per source) and prints the report; train.py with the
    same overrides rebuilds nothing, trains, and logs val/loss and val/bpb per source next to the overall ones."""
    cache = tmp_path / "cache"
    overrides = mixture(inputs, cache)
    assert prepare.main(overrides) == 0
    out = capsys.readouterr().out
    assert "mixture: 2 sources" in out and out.count(" built ") == 2, out
    assert "trained on the train documents of the mixture's sources: austen, sanguo" in out
    before = entries(cache)
    assert sum(name.startswith("tokenizer-") for name in {k.split("/")[0] for k in before}) == 1

    assert prepare.main(overrides) == 0  # again: every entry a hit
    assert capsys.readouterr().out.count(" hit ") == 2

    cfg = compose_config(overrides, run_dir=tmp_path / "run")
    val_loss = train.train(cfg)
    assert math.isfinite(val_loss)
    assert entries(cache) == before  # nothing rebuilt, nothing added
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert all(s["cache"]["hit"] for s in report["sources"].values())
    assert report["sources"]["austen"]["tokens_per_epoch"] > report["sources"]["sanguo"]["tokens_per_epoch"]

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val/loss", "val/bpb", "val/loss/austen", "val/loss/sanguo", "val/bpb/austen", "val/bpb/sanguo"):
        assert tag in tags, (tag, tags)

    # the overall loss is the token-weighted mean of the sources' (every val window measured, at every validation)
    def last(tag: str) -> float:
        return acc.Scalars(tag)[-1].value

    tokens = {n: s["val_tokens"] - 1 for n, s in report["sources"].items()}  # labels: every token but the first
    mean = sum(last(f"val/loss/{n}") * t for n, t in tokens.items()) / sum(tokens.values())
    assert mean == pytest.approx(last("val/loss"), rel=1e-4)
    assert last("val/bpb/sanguo") != pytest.approx(last("val/bpb/austen"), rel=1e-3)


def test_prepare_a_corpus_and_the_datamodule_train_builds_finds_it(tmp_path, capsys):
    """data=text: the datamodule built as train.py builds it (same overrides) loads prepare's entry."""
    src = tmp_path / "austen.jsonl.zst"
    paras = [p for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True) if len(p) > 40][:300]
    src.write_bytes(zstandard.compress("".join(json.dumps({"text": p}) + "\n" for p in paras).encode()))
    overrides = ["data=text", f"data.paths=[{src}]", "data.vocab_size=400", f"data.cache_dir={tmp_path / 'c'}"]
    assert prepare.main(overrides) == 0
    out = capsys.readouterr().out
    assert "documents: 300 read" in out and "cache: built" in out
    built = entries(tmp_path / "c")
    dm = prepare.prepare(overrides)  # what llm.prepare and train.py both call: resolve, build_datamodule, prepare
    assert dm.report["cache"]["hit"] is True and entries(tmp_path / "c") == built
    assert out.split("cache: built ")[1].split()[0] == dm.report["cache"]["key"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data.seq_len=abc"], "data.seq_len=abc"),
        (["data=mixture"], "data.sources is empty"),
        (
            ["data=mixture", "+data.sources.web.paths=[/nonexistent/web.parquet]"],
            "data.sources.web.paths: /nonexistent",
        ),
        (
            ["data=mixture", "+data.sources.web={paths: [x.parquet], wieght: 2}"],
            "data.sources.web.wieght: Key 'wieght'",
        ),
    ],
)
def test_bad_overrides_are_one_line(argv, message, capsys):
    assert prepare.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_help(capsys):
    assert prepare.main(["--help"]) == 0
    assert "usage: python -m llm.prepare [key=value ...]" in capsys.readouterr().out
