"""ratings.jsonl: appended and fsynced before add returns, one per rater and item, a torn last line tolerated."""

from __future__ import annotations

import json
import threading

import pytest

from llm.errors import UserError
from llm.human_eval import ratings as ratings_module
from llm.human_eval.ratings import RatingStore, read_ratings


def rating(item: str, rater: str = "ann", choice: str = "left") -> dict:
    return {"item": item, "rater": rater, "choice": choice, "left": "a", "winner": "a", "score": None, "comment": None}


def test_add_appends_one_line_and_syncs_before_returning(tmp_path, monkeypatch):
    path = tmp_path / "ratings.jsonl"
    synced = []
    real_fsync = ratings_module.os.fsync
    monkeypatch.setattr(ratings_module.os, "fsync", lambda fd: (synced.append(path.read_text()), real_fsync(fd)))
    with RatingStore(path) as store:
        assert store.add(rating("1")) is True
        assert synced[-1].endswith('"comment": null}\n')  # the line was written when fsync ran
        n = len(synced)
        assert store.add({**rating("2"), "comment": "Zoë says <b>hi</b>"}) is True
        assert len(synced) == n + 1
        assert store.rated("ann") == {"1", "2"} and store.rated("bob") == set()
    assert [json.loads(line)["item"] for line in path.read_text(encoding="utf-8").splitlines()] == ["1", "2"]
    assert read_ratings(path)[1]["comment"] == "Zoë says <b>hi</b>"


def test_a_repeat_is_kept_once_even_from_many_threads(tmp_path):
    path = tmp_path / "ratings.jsonl"
    with RatingStore(path) as store:
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(store.add(rating("1", choice="tie")))) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
        assert store.add(rating("1", rater="bob")) is True  # another rater's rating of the item
    assert len(path.read_text().splitlines()) == 2
    with RatingStore(path) as store:  # reopened: still known
        assert store.add(rating("1")) is False
    path.write_text(path.read_text() + json.dumps(rating("1", choice="right")) + "\n")  # a repeat in the file
    assert [r["choice"] for r in read_ratings(path) if r["rater"] == "ann"] == ["tie"]  # the first counts


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_appending(tmp_path):
    path = tmp_path / "ratings.jsonl"
    path.write_text(json.dumps(rating("1")) + "\n" + '{"item": "2", "rat')
    assert [r["item"] for r in read_ratings(path)] == ["1"]
    with RatingStore(path) as store:
        assert store.add(rating("2")) is True
    assert [json.loads(line)["item"] for line in path.read_text().splitlines()] == ["1", "2"]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "ratings.jsonl"
    path.write_text(json.dumps(rating("1")) + "\nnot json\n" + json.dumps(rating("2")) + "\n")
    with pytest.raises(UserError, match=r"ratings.jsonl:2: not a rating"):
        read_ratings(path)
    path.write_text('{"no": "item"}\n')
    with pytest.raises(UserError, match=r"ratings.jsonl:1: not a rating"):
        RatingStore(path)


def test_no_file_is_no_ratings(tmp_path):
    assert read_ratings(tmp_path / "ratings.jsonl") == []
