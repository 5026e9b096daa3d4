"""data=mixture: token proportions against the weights, repetition and subsampling, the per-source report,
determinism and exact resume of the order, per-source val windows, the shared tokenizer and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from datamodules.mixing import MixturePlan
from datamodules.mixture import MixtureDataModule
from datamodules.sources import EMBEDDED_CORPUS, DataError, read_file

SANGUO = Path(__file__).resolve().parents[1] / "data" / "sanguo_yanyi_sample.jsonl"  # six chapters, see tests/data
SEQ = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two real corpora in the formats corpora ship in: Austen's paragraphs as Parquet (column ``body``, several
    row groups), the Chinese chapters as zstd JSON Lines; and a third, tiny source."""
    d = tmp_path_factory.mktemp("mixture-inputs")
    paras = [p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True) if len(p.strip()) > 40][:1500]
    pq.write_table(pa.table({"body": paras}), d / "austen.parquet", row_group_size=400)
    (d / "sanguo.jsonl.zst").write_bytes(zstandard.compress(SANGUO.read_bytes()))
    (d / "small.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[-60:]))
    return {"austen": d / "austen.parquet", "sanguo": d / "sanguo.jsonl.zst", "small": d / "small.jsonl"}


def sources(files: dict[str, Path], **weights: float) -> dict:
    spec = {
        "austen": {"paths": [str(files["austen"])], "text_field": "body"},
        "sanguo": {"paths": [str(files["sanguo"])]},
        "small": {"paths": [str(files["small"])]},
    }
    return {name: {**spec[name], "weight": w} for name, w in weights.items()}


def module(files, cache: Path, weights: dict[str, float] | None = None, **kw) -> MixtureDataModule:
    weights = weights or {"austen": 0.5, "sanguo": 0.3, "small": 0.2}
    dm = MixtureDataModule(
        sources=sources(files, **weights), seq_len=SEQ, batch_size=4, vocab_size=600, cache_dir=str(cache), **kw
    )
    dm.prepare()
    return dm


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mixture-cache")


@pytest.fixture(scope="module")
def dm(files, cache) -> MixtureDataModule:
    return module(files, cache)


def drawn_by_source(dm: MixtureDataModule, epoch: int = 0) -> np.ndarray:
    """Windows of each source in one epoch of the train order."""
    order = dm.plan.order(epoch, dm.seed)
    source = np.searchsorted(np.cumsum(dm.plan.windows), order, side="right")
    return np.bincount(source, minlength=len(dm.plan.names))


# ---------------------------------------------------------------------------------------------------------
# the plan


def test_counts_follow_the_weights_exactly_and_add_up():
    plan = MixturePlan.build(["a", "b", "c"], [5, 3, 2], [1000, 10, 77], epoch_windows=1001)
    # 500.5, 300.3, 200.2: the largest remainder takes the window left over
    assert plan.per_epoch.tolist() == [501, 300, 200] and plan.epoch_windows == 1001
    assert plan.repetitions().round(3).tolist() == [0.501, 30.0, 2.597]


def test_a_subsampled_source_shows_every_window_before_repeating_and_a_repeated_one_each_once_per_pass():
    plan = MixturePlan.build(["big", "tiny"], [1, 1], [10, 3], epoch_windows=8)  # big 4 of 10, tiny 4 of 3
    big = np.concatenate([plan.source_windows(0, e, seed=7) for e in range(5)])  # two passes over big's 10
    assert sorted(big[:10].tolist()) == list(range(10)) and sorted(big[10:].tolist()) == list(range(10))
    tiny = np.concatenate([plan.source_windows(1, e, seed=7) for e in range(3)])  # 12 = four passes over 3
    for k in range(4):
        assert sorted(tiny[3 * k : 3 * k + 3].tolist()) == [0, 1, 2]


def test_plan_refuses_bad_weights_and_empty_sources():
    with pytest.raises(DataError, match=r"data.sources.b.weight=0.0 must be a positive number"):
        MixturePlan.build(["a", "b"], [1, 0], [5, 5])
    with pytest.raises(DataError, match=r"data.sources.b: no whole train window"):
        MixturePlan.build(["a", "b"], [1, 1], [5, 0])


# ---------------------------------------------------------------------------------------------------------
# the DataModule on real corpora


def test_token_proportions_match_the_weights(dm):
    drawn = drawn_by_source(dm)
    tokens = drawn * SEQ  # every window predicts SEQ tokens, whatever its source
    assert tokens.sum() == dm.report["mixture"]["tokens_per_epoch"]
    share = tokens / tokens.sum()
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=1 / drawn.sum())  # exact up to rounding a window
    # the report says the same, and that the small source is repeated and the large one subsampled
    r = dm.report["sources"]
    assert [r[n]["windows_per_epoch"] for n in ("austen", "sanguo", "small")] == drawn.tolist()
    assert r["small"]["repetitions_per_epoch"] > 1 > r["austen"]["repetitions_per_epoch"]
    for s in r.values():
        assert s["documents"]["kept"] > 0 and s["tokens_available"] > 0 and s["val_tokens"] > 0
        assert s["repetitions_per_epoch"] == pytest.approx(s["windows_per_epoch"] / s["windows_available"], abs=1e-6)
    # the windows really come from their sources: Chinese text only in sanguo's
    tok = dm.tokenizer
    start = int(dm.plan.offsets[1])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in tok.decode(dm.train_dataset[start]["input_ids"].tolist()))
    assert not any("\u4e00" <= ch <= "\u9fff" for ch in tok.decode(dm.train_dataset[0]["input_ids"].tolist()))


def test_epochs_differ_and_the_order_is_a_function_of_the_seed(dm, files, cache):
    again = module(files, cache)
    assert np.array_equal(dm.plan.order(0, dm.seed), again.plan.order(0, again.seed))
    assert not np.array_equal(dm.plan.order(0, dm.seed), dm.plan.order(1, dm.seed))
    assert (drawn_by_source(dm, 1) == drawn_by_source(dm, 0)).all()  # the same counts every epoch


def test_a_resumed_loader_draws_the_same_sequence(dm, files, cache):
    """Stop after 5 batches, restore the state into a new DataModule: its batches are the uninterrupted run's."""
    full = [b["input_ids"] for _, b in zip(range(9), dm.train_dataloader())]
    dm.train_sampler.epoch = 0
    it = iter(dm.train_dataloader())
    for _ in range(5):
        next(it)
    state = dm.train_sampler.state_dict()
    assert state["position"] == 5 * 4
    fresh = module(files, cache)
    fresh.load_state_dict(state)
    resumed = [b["input_ids"] for _, b in zip(range(4), fresh.train_dataloader())]
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a, b)


def test_val_windows_are_per_source_interleaved_and_whole(dm):
    val = dm.val_dataset
    n = [len(s) for s in val.sources]
    sources = np.array([int(val[i]["source"]) for i in range(len(val))])
    assert np.bincount(sources).tolist() == n  # every window of every source, once
    first = sources[: len(sources) // 2]  # any first part holds every source in proportion
    assert all(abs(np.sum(first == s) - n[s] / 2) <= 1 for s in range(3))
    assert dm.val_sources == ["austen", "sanguo", "small"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["source"].shape == (4,) and batch["input_ids"].shape == (4, SEQ)


def test_one_tokenizer_and_reweighting_rebuilds_nothing(dm, files, cache):
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith(".") and p.name != "files")
    assert sum(e.startswith("tokenizer-") for e in entries) == 1 and len(entries) == 4  # tokenizer + 3 sources
    assert dm.report["tokenizer"]["source"].startswith("trained on the train documents of the mixture's sources")
    other = module(files, cache, weights={"austen": 1, "sanguo": 5, "small": 1})
    assert all(s["cache"]["hit"] for s in other.report["sources"].values())
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".") and p.name != "files") == entries
    assert other.tokenizer.get_vocab() == dm.tokenizer.get_vocab()
    assert drawn_by_source(other)[1] > drawn_by_source(dm)[1]


def test_per_source_settings_override_the_mixture(files, tmp_path):
    """A source's own cleaning replaces the mixture's: the min_chars rule drops the short documents of one only."""
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"Short line {i}."}) + "\n" for i in range(400)))
    mix = {
        "strict": {"paths": [str(short)], "weight": 1},
        "lenient": {"paths": [str(short)], "weight": 1, "cleaning": [{"name": "whitespace"}]},
        "austen": {"paths": [str(files["austen"])], "text_field": "body", "weight": 1},
    }
    with pytest.raises(DataError, match=r"data.sources.strict.cleaning dropped all 400 documents"):
        MixtureDataModule(sources=mix, seq_len=SEQ, vocab_size=600, cache_dir=str(tmp_path / "c")).prepare()
    mix["strict"]["cleaning"] = [{"name": "min_chars", "value": 14}]
    dm = MixtureDataModule(sources=mix, seq_len=SEQ, vocab_size=600, cache_dir=str(tmp_path / "c"))
    dm.prepare()
    docs = {n: s["documents"] for n, s in dm.report["sources"].items()}
    assert docs["lenient"]["kept"] == 400 and 0 < docs["strict"]["kept"] < 400


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"a": {"paths": ["x"], "wieght": 1}}, "data.sources.a.wieght: Key 'wieght' not in 'SourceSpec'"),
        ({"a": {"paths": ["x"], "weight": "lots"}}, "data.sources.a.weight: Value 'lots' of type 'str' could not be"),
        ({"a": {"weight": 1}}, "data.sources.a.paths is missing"),
        ({"a": {"paths": ["x"], "weight": -2}}, "data.sources.a.weight=-2.0 must be a positive number"),
        ({}, "data.sources is empty"),
    ],
)
def test_bad_sources_are_one_line(bad, message):
    with pytest.raises(DataError) as e:
        MixtureDataModule(sources=bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_missing_file_names_the_source(tmp_path):
    dm = MixtureDataModule(sources={"web": {"paths": [str(tmp_path / "none.parquet")]}}, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"^data.sources.web.paths: {tmp_path / 'none.parquet'} does not exist$"):
        dm.prepare()
