"""Reading documents: formats, gzip, directories, globs, encodings, and the errors users see."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

import pytest

from datamodules import jsonstream, sources
from datamodules.sources import (
    EMBEDDED_CORPUS,
    DataError,
    SourceStats,
    file_format,
    find_files,
    read_documents,
    read_file,
    read_records,
    sniff,
)


def write(path: Path, data: str | bytes, gz: bool = False) -> Path:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def docs_of(paths, **kw) -> list[str]:
    files, _ = find_files(paths)
    return list(read_documents(files, **kw))


@pytest.mark.parametrize("gz", [False, True])
def test_txt_is_one_document(tmp_path, gz):
    p = write(tmp_path / "a.txt", "First paragraph.\n\nSecond one,\nwrapped.\n", gz)
    assert docs_of([p]) == ["First paragraph.\n\nSecond one,\nwrapped.\n"]


@pytest.mark.parametrize("gz", [False, True])
def test_txt_split_paragraphs_on_blank_line_runs(tmp_path, gz):
    p = write(tmp_path / "a.txt", "\n\nOne\nline two\n\n\n  \n\t\nTwo\n\nThree", gz)
    assert docs_of([p], split_paragraphs=True) == ["One\nline two\n", "Two\n", "Three"]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_text_field(tmp_path, gz):
    lines = [json.dumps({"title": "a", "body": "alpha"}), "", json.dumps({"title": "b", "body": "béta\n中文"})]
    p = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n", gz)
    assert docs_of([p], text_field="body") == ["alpha", "béta\n中文"]


@pytest.mark.parametrize("gz", [False, True])
def test_json_list_object_and_strings(tmp_path, gz):
    a = write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two"}]), gz)
    b = write(tmp_path / "b.json", json.dumps({"text": "three"}), gz)
    c = write(tmp_path / "c.json", json.dumps(["four", "five"]), gz)
    assert docs_of([a, b, c]) == ["one", "two", "three", "four", "five"]


def test_jsonl_split_paragraphs_applies_to_records(tmp_path):
    p = write(tmp_path / "a.jsonl", json.dumps({"text": "p1\n\n\np2 a\np2 b"}) + "\n")
    assert docs_of([p], split_paragraphs=True) == ["p1\n", "p2 a\np2 b"]


def test_directory_recursive_sorted_and_skips(tmp_path):
    write(tmp_path / "d" / "b.txt", "b")
    write(tmp_path / "d" / "a.jsonl", json.dumps({"text": "a"}) + "\n")
    write(tmp_path / "d" / "sub" / "c.txt", "c", gz=True)
    write(tmp_path / "d" / "notes.csv", "x,y")
    write(tmp_path / "d" / ".hidden.txt", "h")
    write(tmp_path / "d" / ".git" / "x.txt", "never read")
    files, skipped = find_files([tmp_path / "d"])
    assert [f.name for f in files] == ["a.jsonl", "b.txt", "c.txt.gz"]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert reasons == {"notes.csv": "unsupported file type", ".hidden.txt": "hidden file"}
    assert list(read_documents(files)) == ["a", "b", "c"]


def test_globs_including_recursive(tmp_path):
    write(tmp_path / "x1.txt", "1")
    write(tmp_path / "x2.txt", "2")
    write(tmp_path / "deep" / "x3.txt", "3")
    write(tmp_path / "y.txt", "y")
    assert docs_of([str(tmp_path / "x*.txt")]) == ["1", "2"]
    assert sorted(docs_of([str(tmp_path / "**" / "x*.txt")])) == ["1", "2", "3"]
    # a file named twice (directly and by a glob) is read once
    assert docs_of([tmp_path / "y.txt", str(tmp_path / "y*")]) == ["y"]


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"matches no file"):
        find_files([str(tmp_path / "*.jsonl")])


def test_missing_path_error_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=str(missing)) as e:
        find_files([missing])
    assert "\n" not in str(e.value)


def test_unsupported_named_file_is_an_error(tmp_path):
    p = write(tmp_path / "table.csv", "a,b")
    with pytest.raises(DataError, match="table.csv"):
        find_files([p])


def test_wrong_text_field_error_names_key_and_line(tmp_path):
    p = write(tmp_path / "a.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError) as e:
        docs_of([p])
    msg = str(e.value)
    assert "a.jsonl:2" in msg and "'text'" in msg and "'content'" in msg and "\n" not in msg


def test_wrong_text_field_in_json(tmp_path):
    p = write(tmp_path / "a.json", json.dumps([{"body": "x"}]))
    with pytest.raises(DataError, match=r"a\.json\[0\].*text_field='text'"):
        docs_of([p])


def test_non_string_field_and_invalid_json(tmp_path):
    p = write(tmp_path / "a.jsonl", json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="not a string"):
        docs_of([p])
    q = write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: invalid JSON"):
        docs_of([q])


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_bom_is_stripped(tmp_path, name):
    body = "Hello" if name.endswith(".txt") else json.dumps({"text": "Hello"})
    p = write(tmp_path / name, b"\xef\xbb\xbf" + body.encode())
    assert docs_of([p]) == ["Hello"]


def test_crlf_kept_by_reading_and_split_on(tmp_path):
    p = write(tmp_path / "a.txt", "one\r\ntwo\r\n\r\nthree\r\n")
    assert docs_of([p]) == ["one\r\ntwo\r\n\r\nthree\r\n"]  # line endings are the whitespace rule's business
    assert docs_of([p], split_paragraphs=True) == ["one\r\ntwo\r\n", "three\r\n"]


def test_invalid_utf8_replaced_and_counted(tmp_path):
    # two invalid bytes, plus a U+FFFD that was in the file legitimately (not counted)
    p = write(tmp_path / "a.txt", b"caf\xe9 ok \xff end \xef\xbf\xbd")
    stats = SourceStats()
    files, _ = find_files([p])
    assert list(read_documents(files, stats=stats)) == ["caf\ufffd ok \ufffd end \ufffd"]
    assert stats.invalid_utf8_replacements == 2
    assert stats.files == 1 and stats.bytes == p.stat().st_size and stats.documents == 1


def test_invalid_utf8_inside_jsonl_does_not_crash(tmp_path):
    p = write(tmp_path / "a.jsonl", b'{"text": "ok \xc3"}\n')
    stats = SourceStats()
    assert list(read_file(p, stats=stats)) == ["ok \ufffd"]
    assert stats.invalid_utf8_replacements == 1


def test_lone_surrogate_escapes_in_json_are_replaced(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "bad \\ud800 pair \\ud83d\\ude00"}\n')
    stats = SourceStats()
    assert list(read_file(p, stats=stats)) == ["bad \ufffd pair \U0001f600"]
    assert stats.invalid_utf8_replacements == 1


def test_corrupt_gzip_is_a_data_error(tmp_path):
    p = write(tmp_path / "a.txt.gz", b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match="a.txt.gz"):
        docs_of([p])


def test_file_format():
    assert file_format("x.TXT") == "txt"
    assert file_format("x.jsonl.gz") == "jsonl"
    assert file_format("x.json") == "json"
    assert file_format("x.csv") is None and file_format("x.gz") is None


def test_embedded_corpus_reads():
    docs = list(read_file(EMBEDDED_CORPUS))
    assert len(docs) == 6
    assert docs[0].startswith("EMMA")


# ---------------------------------------------------------------------------------------------------------
# what is not text, and what is barely text


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary file (NUL bytes)"),
        ("noise.txt", bytes((i * 7919 + 13) % 255 + 1 for i in range(4000)), "binary or not UTF-8"),  # no NUL
        ("cyrillic.jsonl", '{"text": "Привет, как дела? Всё хорошо."}\n'.encode("cp1251") * 20, "not UTF-8"),
        ("blob.txt", gzip.compress(b"x" * 1000) * 3, "binary"),
    ],
)
def test_binary_and_legacy_encoded_files_are_skipped_with_the_reason(tmp_path, name, data, reason):
    good = write(tmp_path / "good.txt", "Some real text.")
    bad = write(tmp_path / name, data)
    stats = SourceStats()
    assert list(read_documents([good, bad], stats=stats)) == ["Some real text."]
    assert stats.files == 1 and stats.documents == 1
    assert len(stats.skipped_files) == 1 and stats.skipped_files[0]["path"] == str(bad)
    assert reason in stats.skipped_files[0]["reason"]


def test_a_few_invalid_bytes_are_replaced_not_skipped(tmp_path):
    p = write(tmp_path / "latin1.txt", "Café naïve résumé, in Latin-1. ".encode("latin-1") * 20)
    stats = SourceStats()
    (doc,) = read_file(p, stats=stats)
    assert doc.startswith("Caf\ufffd na\ufffdve r\ufffdsum\ufffd") and stats.invalid_utf8_replacements == 80
    assert stats.skipped_files == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom_are_decoded(tmp_path, encoding):
    raw = "Hello 中文\r\n\r\nSecond".encode(encoding)
    if encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw
    p = write(tmp_path / "a.txt", raw)
    assert docs_of([p], split_paragraphs=True) == ["Hello 中文\r\n", "Second"]


def test_truncated_gzip_is_a_one_line_error_naming_the_file(tmp_path):
    body = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode()
    full = gzip.compress(body)
    p = write(tmp_path / "cut.jsonl.gz", full[: len(full) // 2])
    with pytest.raises(DataError) as e:
        docs_of([p])
    assert str(e.value) == f"{p}: cannot be read (truncated: the compressed stream ends early)"


def test_empty_files_are_counted(tmp_path):
    a = write(tmp_path / "a.txt", "")
    b = write(tmp_path / "b.jsonl", "\n\n", gz=True)
    c = write(tmp_path / "c.json", "[]")
    d = write(tmp_path / "d.txt", "text")
    stats = SourceStats()
    assert list(read_documents([a, b, c, d], stats=stats)) == ["text"]
    assert stats.empty_files == 3 and stats.files == 4


def test_reading_streams(tmp_path):
    """The first document comes out long before the file is read: memory holds a document, not a file."""
    lines = "".join(json.dumps({"text": f"line {i} " * 10}) + "\n" for i in range(20_000))
    p = write(tmp_path / "big.jsonl", lines)
    stats = SourceStats()
    docs = read_file(p, stats=stats)
    next(docs)
    assert 0 < stats.disk_bytes < p.stat().st_size / 10
    assert sum(1 for _ in docs) == 19_999 and stats.disk_bytes == p.stat().st_size


def test_json_list_is_streamed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonstream, "JSON_CHUNK_CHARS", 7)  # elements, numbers and strings cut across chunks
    records = [{"text": "a" * 30}, {"text": "b", "n": 123456789}, "plain string", {"text": "中文 \\u00e9"}]
    p = write(tmp_path / "a.json", " [\n" + ",\n".join(json.dumps(r) for r in records) + "\n] \n")
    assert docs_of([p]) == ["a" * 30, "b", "plain string", "中文 \\u00e9"]


@pytest.mark.parametrize(
    "body, match",
    [
        ('[{"text": "a"}, {"text": tru}]', r"invalid JSON \(Expecting value in element 1\)"),
        ('[{"text": "a"},]', r"trailing comma after element 0"),
        ('[{"text": "a"}', r"the list ends after 1 elements without '\]'"),
        ('[{"text": "a"}] x', r"extra data after the list"),
        ('{"text": ', r"invalid JSON \(Expecting value at line 1\)"),
    ],
)
def test_invalid_json_names_file_and_element(tmp_path, body, match):
    p = write(tmp_path / "a.json", body)
    with pytest.raises(DataError, match=match) as e:
        docs_of([p])
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


def test_sniff():
    assert sniff(b"plain text\n") == ("utf-8-sig", None)
    assert sniff(b"") == ("utf-8-sig", None)
    assert sniff(codecs.BOM_UTF16_LE + "hi".encode("utf-16-le")) == ("utf-16", None)
    assert sniff("中文".encode()[:-1]) == ("utf-8-sig", None)  # a character cut by the sniff window is fine
    assert sniff(b"a\x00b")[1] == "binary file (NUL bytes)"


# ---------------------------------------------------------------------------------------------------------
# records: the rows of example sets, read as documents are


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("bom.jsonl", codecs.BOM_UTF8 + b'{"text": "a\xffb", "n": [1, "\\ud800"]}\n\n{"text": "c"}\n'),
        ("utf16.jsonl", '{"text": "a\ufffdb", "n": [1, "\ufffd"]}\n\n{"text": "c"}\n'.encode("utf-16")),
        ("list.json.gz", gzip.compress(b'[{"text": "a\xffb", "n": [1, "\\ud800"]}, {"text": "c"}]')),
    ],
)
def test_records_are_read_and_counted_as_documents_are(tmp_path, name, raw):
    path = write(tmp_path / name, raw)
    docs_stats, rows_stats = SourceStats(), SourceStats()
    docs = list(read_file(path, "text", stats=docs_stats))
    rows = list(read_records([path], rows_stats))
    assert docs == ["a\ufffdb", "c"] and [r["text"] for _, r in rows] == docs
    assert rows[0][1]["n"] == [1, "\ufffd"]  # a lone surrogate anywhere in the row is replaced, and counted
    lines = [f"{path}:1", f"{path}:3"] if "jsonl" in name else [f"{path}[0]", f"{path}[1]"]
    assert [where for where, _ in rows] == lines
    docs_stats.invalid_utf8_replacements += 1 if "utf16" not in name else 0  # the surrogate outside "text"
    assert rows_stats == docs_stats


def test_records_skip_binary_count_empty_and_name_errors(tmp_path):
    binary = write(tmp_path / "a.jsonl", b"\x00\x01\x02" * 10)
    empty = write(tmp_path / "b.jsonl", "\n")
    stats = SourceStats()
    assert list(read_records([binary, empty], stats)) == []
    assert stats.skipped_files == [{"path": str(binary), "reason": "binary file (NUL bytes)"}]
    assert stats.empty_files == 1 and stats.files == 1
    assert sources.unread(stats) == ["1 empty file", f"1 skipped, e.g. {binary}: binary file (NUL bytes)"]
    with pytest.raises(DataError, match=r"c\.jsonl:2: expected a JSON object, got list"):
        list(read_records([write(tmp_path / "c.jsonl", '{"a": 1}\n[1]\n')]))
    with pytest.raises(DataError, match=r"d\.txt is not JSON Lines or JSON"):
        list(read_records([write(tmp_path / "d.txt", "text")]))
    cut = gzip.compress(b'{"a": 1}\n' * 1000)
    with pytest.raises(DataError, match=r"e\.jsonl\.gz: cannot be read \(truncated"):
        list(read_records([write(tmp_path / "e.jsonl.gz", cut[: len(cut) // 2])]))
