"""Reading documents: formats, gzip, directories, globs, encodings, and the errors users see."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from datamodules.sources import (
    EMBEDDED_CORPUS,
    DataError,
    SourceStats,
    file_format,
    find_files,
    read_documents,
    read_file,
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
