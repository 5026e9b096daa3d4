"""Cleaning rules, one test each, and the Cleaner's counts and report."""

from __future__ import annotations

import random

import pytest

from datamodules.cleaning import (
    DEFAULT_RULES,
    EXAMPLE_CHARS,
    OPTIONAL_RULES,
    RULE_NAMES,
    Cleaner,
    Dedup,
    NearDedup,
    control_chars,
    letter_ratio,
    lsh_bands,
    max_chars,
    min_chars,
    nfc,
    repeated_lines,
    whitespace,
)
from datamodules.sources import DataError

PROSE = "It is a truth universally acknowledged, that a single man in possession of a good fortune."


def test_nfc_composes_and_form_is_configurable():
    decomposed = "Cafe\u0301 \ufb01"  # e + combining acute; the "fi" ligature
    assert nfc(decomposed) == "Caf\u00e9 \ufb01"
    assert nfc(decomposed, form="NFKC") == "Caf\u00e9 fi"
    assert nfc("Caf\u00e9", form="NFD") == "Cafe\u0301"
    assert nfc(PROSE) is PROSE  # already normalised: untouched


def test_control_chars_removes_invisibles_keeps_layout():
    text = "a\x00b\x07c\u200bd\u00ade\ufefff\x85g\th\ni\r\nj\u200dk"
    assert control_chars(text) == "abcdefg\th\ni\r\nj\u200dk"  # ZWJ kept (emoji, Indic scripts)


def test_whitespace_line_endings_trailing_spaces_blank_runs():
    text = "  \n\nTitle  \r\nline\t \r\rold mac\n\n\n\n\nafter\n \n \n end \n\n"
    assert whitespace(text) == "Title\nline\n\nold mac\n\nafter\n\n end"
    assert whitespace("a\n\nb") == "a\n\nb"


def test_min_chars():
    assert min_chars("x" * 32, value=32)
    assert not min_chars("x" * 31, value=32)


def test_max_chars():
    assert max_chars("x" * 10, value=10)
    assert not max_chars("x" * 11, value=10)


def test_repeated_lines():
    boiler = "\n".join(["Home | About | Contact"] * 5 + ["Some actual content here"])
    assert not repeated_lines(boiler, max_ratio=0.3)
    assert repeated_lines("one\ntwo\nthree\nfour\none", max_ratio=0.3)  # 1 of 5 repeats
    assert repeated_lines("same\nsame", max_ratio=0.3)  # too short to judge


def test_letter_ratio_any_script():
    assert letter_ratio(PROSE, min_ratio=0.5)
    assert letter_ratio("滚滚长江东逝水，浪花淘尽英雄。", min_ratio=0.5)
    assert not letter_ratio("| 12.5 | 33.1 | -- | 0x4F |", min_ratio=0.5)
    assert not letter_ratio("   \n ", min_ratio=0.5)


def test_dedup_exact_content():
    d = Dedup()
    assert d("a doc") and d("another") and not d("a doc") and d("a doc ")


def test_cleaner_counts_and_report():
    docs = [PROSE, "short", PROSE, "  " + PROSE + "  \r\n", "=" * 40]
    cleaner = Cleaner(
        [
            {"name": "whitespace"},
            {"name": "min_chars", "value": 10},
            {"name": "letter_ratio", "min_ratio": 0.5},
            {"name": "dedup"},
        ]
    )
    kept = list(cleaner(docs))
    assert kept == [PROSE]
    rep = cleaner.report()
    assert rep["documents"] == {"read": 5, "kept": 1, "dropped": 4}
    assert rep["characters"] == {"read": sum(map(len, docs)), "kept": len(PROSE)}
    assert rep["rules"]["whitespace"] == {"dropped": 0, "changed": 1, "examples": []}
    assert rep["rules"]["min_chars"] == {"dropped": 1, "changed": 0, "examples": ["short"]}
    assert rep["rules"]["letter_ratio"]["dropped"] == 1
    assert rep["rules"]["dedup"] == {"dropped": 2, "changed": 0, "examples": [PROSE, PROSE]}  # after whitespace


def test_cleaner_examples_capped_and_truncated():
    cleaner = Cleaner([{"name": "max_chars", "value": 5}])
    list(cleaner(["y" * 1000] * 8))
    ex = cleaner.report()["rules"]["max_chars"]["examples"]
    assert len(ex) == 5 and all(len(e) == EXAMPLE_CHARS + 3 and e.endswith("...") for e in ex)
    assert cleaner.report()["rules"]["max_chars"]["dropped"] == 8


def test_rule_order_matters():
    text = "x" * 8 + " " * 8
    assert Cleaner([{"name": "min_chars", "value": 10}, "whitespace"]).clean(text) == "x" * 8
    assert Cleaner(["whitespace", {"name": "min_chars", "value": 10}]).clean(text) is None


def test_defaults_and_names():
    assert Cleaner(None).config == DEFAULT_RULES
    # every rule is on by default, except the optional ones
    assert [r["name"] for r in DEFAULT_RULES] == [n for n in RULE_NAMES if n not in OPTIONAL_RULES]
    assert Cleaner([]).clean(" raw ") == " raw "


def test_near_dedup_runs_only_when_configured():
    """The default rules drop exact duplicates only; a near duplicate needs near_dedup in data.cleaning."""
    doc = (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
        * 3
    )
    near = doc.replace("wife", "wive", 1)
    default = Cleaner(None)
    assert [default.clean(d) is not None for d in (doc, doc, near)] == [True, False, True]
    configured = Cleaner([*DEFAULT_RULES, "near_dedup"])
    assert [configured.clean(d) is not None for d in (doc, near)] == [True, False]


@pytest.mark.parametrize(
    "rules, match",
    [
        ([{"name": "nope"}], r"data\.cleaning\[0\]: unknown cleaning rule 'nope'"),
        ([{"name": "min_chars", "min": 3}], r"rule 'min_chars' has no parameter 'min' \(accepted: value\)"),
        ([{"name": "dedup", "x": 1}], r"rule 'dedup' has no parameter 'x'"),
        ([{"name": "nfc", "form": "XYZ"}], r"nfc form"),
        (["nfc", "nfc"], r"data\.cleaning\[1\]: rule 'nfc' is listed twice"),
        ([{"value": 3}], r"data\.cleaning\[0\]: expected a mapping with a 'name' key"),
    ],
)
def test_config_errors_name_the_rule(rules, match):
    with pytest.raises(DataError, match=match):
        Cleaner(rules)


def test_letter_ratio_fast_paths_match_the_definition():
    def slow(text: str) -> tuple[int, int]:
        letters = sum(ch.isalpha() for ch in text)
        return letters, letters + sum(not ch.isalpha() and not ch.isspace() for ch in text)

    rng = random.Random(0)
    alphabet = "ab Z9_-.,\t\n\u00e9\u4e2d\u0416\u00b2\u2003\u3000\U0001f600"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        letters, total = slow(text)
        for ratio in (0.3, 0.5, 0.8):
            assert letter_ratio(text, min_ratio=ratio) == (total > 0 and letters / total >= ratio), text


def test_dedup_merges_into_sorted_digests(monkeypatch):
    monkeypatch.setattr(Dedup, "MERGE_EVERY", 8)
    d = Dedup()
    docs = [f"document {i}" for i in range(100)]
    assert all(d(x) for x in docs)
    assert len(d._sorted) == 96 and not any(d(x) for x in docs)  # found whether merged or recent


# ---------------------------------------------------------------------------------------------------------
# near duplicates (MinHash + LSH)

PARAGRAPH = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
    "some of the best blessings of existence; and had lived nearly twenty-one years in the world with very "
    "little to distress or vex her."
)


def test_near_dedup_drops_small_edits_keeps_different_text():
    nd = NearDedup()
    assert (nd.bands, nd.rows) == lsh_bands(128, 0.8) == (9, 13)
    assert nd(PARAGRAPH)
    assert not nd(PARAGRAPH.replace("clever", "clver"))  # a typo
    assert not nd("  " + PARAGRAPH.upper().replace(" ", "\n") + " ")  # case and whitespace do not count
    assert nd(PARAGRAPH[: len(PARAGRAPH) // 2])  # half of it: Jaccard ~0.5, kept
    assert nd("It is a truth universally acknowledged, that a single man in possession of a good fortune.")
    zh = "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。青山依旧在，几度夕阳红。白发渔樵江渚上，惯看秋月春风。"
    assert nd(zh) and not nd(zh.replace("英雄", "豪杰"))  # characters, not words: works without spaces


def test_near_dedup_jaccard_estimate_and_determinism():
    a, b = NearDedup(num_perm=256), NearDedup(num_perm=256)
    text = " ".join(f"w{i}" for i in range(300))
    edited = text.replace("w150", "x150").replace("w10 ", "x10 ")
    sa, sb = a.signature(text), b.signature(edited)
    assert (sa == b.signature(text)).all()  # the same hash functions in every instance
    x, y = set(a.shingles(text).tolist()), set(a.shingles(edited).tolist())
    jaccard = len(x & y) / len(x | y)
    assert abs((sa == sb).mean() - jaccard) < 0.1


def test_near_dedup_rule_is_optional_configurable_and_reported():
    docs = [PARAGRAPH, PARAGRAPH + " The end.", "A different document about something else entirely, at length."]
    assert len(list(Cleaner(["dedup"])(docs))) == 3
    cleaner = Cleaner(["dedup", {"name": "near_dedup", "threshold": 0.7, "num_perm": 64, "shingle": 4}])
    assert list(cleaner(docs)) == [docs[0], docs[2]]
    rule = cleaner.report()["rules"]["near_dedup"]
    assert rule["dropped"] == 1 and rule["examples"] == [docs[1][:EXAMPLE_CHARS] + "..."]
    assert Cleaner([{"name": "near_dedup", "bands": 16, "num_perm": 64}]).rules[0].fn.rows == 4


@pytest.mark.parametrize(
    "params, match",
    [
        ({"threshold": 1.5}, r"data\.cleaning\[0\]: rule 'near_dedup': threshold=1\.5 must be in \(0, 1\]"),
        ({"num_perm": 1}, r"num_perm=1 must be at least 2"),
        ({"bands": 0}, r"bands=0 must be between 1 and num_perm=128"),
        ({"shingles": 3}, r"rule 'near_dedup' has no parameter 'shingles' \(accepted: num_perm, threshold"),
    ],
)
def test_near_dedup_config_errors(params, match):
    with pytest.raises(DataError, match=match):
        Cleaner([{"name": "near_dedup", **params}])
