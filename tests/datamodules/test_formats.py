"""The formats corpora ship in: Parquet (a text column, row-group batches) and Zstandard-compressed text and JSON
Lines, streamed; with the bad-input rules of the other formats (truncation and a missing column are one line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from datamodules import parquet
from datamodules.sources import DataError, SourceStats, file_format, find_files, read_documents, read_file, read_records

ROOT = Path(__file__).resolve().parents[2]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"


def jsonl(n: int, field: str = "text") -> bytes:
    return "".join(json.dumps({field: f"{TEXT} ({i}).", "id": i}) + "\n" for i in range(n)).encode()


def write_parquet(path: Path, texts: list, row_group_size: int = 100, **columns) -> Path:
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)
    return path


def test_file_formats_of_the_new_suffixes():
    assert file_format("a.parquet") == "parquet" and file_format("A.PARQUET") == "parquet"
    assert file_format("a.jsonl.zst") == "jsonl" and file_format("a.txt.zst") == "txt"
    assert file_format("a.json.zst") == "json"
    assert file_format("00.zst") == "jsonl"  # The Pile's and SlimPajama's names
    assert file_format("a.parquet.gz") is None and file_format("a.parquet.zst") is None


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.zst"])
def test_jsonl_zst_reads_like_jsonl_across_frames(tmp_path, name):
    # two frames, as `cat a.zst b.zst` or a parallel compressor writes them
    p = tmp_path / name
    p.write_bytes(zstandard.compress(jsonl(300)) + zstandard.ZstdCompressor(level=1).compress(jsonl(5)))
    stats = SourceStats()
    docs = list(read_file(p, stats=stats))
    assert docs == [f"{TEXT} ({i})." for i in range(300)] + [f"{TEXT} ({i})." for i in range(5)]
    assert stats.files == 1 and stats.bytes == len(jsonl(300)) + len(jsonl(5))


def test_txt_zst_and_records_of_jsonl_zst(tmp_path):
    t = tmp_path / "a.txt.zst"
    t.write_bytes(zstandard.compress(b"One\n\nTwo\n"))
    assert list(read_file(t, split_paragraphs=True)) == ["One\n", "Two\n"]
    r = tmp_path / "rows.jsonl.zst"
    r.write_bytes(zstandard.compress(jsonl(3)))
    assert [rec["id"] for _, rec in read_records([r])] == [0, 1, 2]


def test_zst_written_by_streaming_without_content_size(tmp_path):
    p = tmp_path / "s.jsonl.zst"
    with open(p, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        w.write(jsonl(50))
    assert len(list(read_file(p))) == 50


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_zst_is_one_line_naming_the_file(tmp_path, cut):
    full = zstandard.compress(jsonl(3000))
    p = tmp_path / "cut.jsonl.zst"
    p.write_bytes(full[: int(len(full) * cut)])
    with pytest.raises(DataError) as e:
        list(read_file(p))
    assert str(e.value) == f"{p}: cannot be read (truncated: the compressed stream ends early)"


def test_corrupt_zst_is_one_line(tmp_path):
    p = tmp_path / "bad.jsonl.zst"
    p.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 100)
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: cannot be read \(not a valid zstd stream") as e:
        list(read_file(p))
    assert "\n" not in str(e.value)


def test_parquet_reads_the_text_column_over_row_groups(tmp_path):
    texts = [f"{TEXT} ({i})." for i in range(2500)]
    p = write_parquet(tmp_path / "a.parquet", texts, row_group_size=300, id=list(range(2500)))
    assert pq.ParquetFile(p).num_row_groups == 9
    stats = SourceStats()
    assert list(read_file(p, stats=stats)) == texts
    assert stats.files == 1 and stats.documents == 2500
    assert stats.bytes == sum(len(t.encode()) for t in texts) and stats.disk_bytes == p.stat().st_size


def test_parquet_text_field_and_split_paragraphs(tmp_path):
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"content": ["A\n\nB", "C"], "text": ["x", "y"]}), p)
    assert list(read_file(p, text_field="content", split_paragraphs=True)) == ["A\n", "B", "C"]


def test_parquet_streams_in_batches(tmp_path, monkeypatch):
    """The first document comes out after one batch is decoded, not the whole file."""
    monkeypatch.setattr(parquet, "BATCH_ROWS", 10)
    p = write_parquet(tmp_path / "big.parquet", [f"{TEXT} {i}" for i in range(5000)], row_group_size=1000)
    stats = SourceStats()
    docs = read_file(p, stats=stats)
    next(docs)
    assert stats.documents == 1 and stats.disk_bytes == 0  # nothing counted as read past the first batch
    assert stats.bytes == sum(len(f"{TEXT} {i}".encode()) for i in range(10))


def test_parquet_missing_column_is_one_line(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a"], "url": ["u"]}), p)
    with pytest.raises(DataError) as e:
        list(read_file(p))
    assert str(e.value) == f"{p}: no column data.text_field='text' (columns: 'content', 'url')"


def test_parquet_non_string_column_and_null_are_one_line(tmp_path):
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), p)
    with pytest.raises(DataError, match=r"n\.parquet: column data.text_field='text' is int64, not a string"):
        list(read_file(p))
    q = write_parquet(tmp_path / "null.parquet", ["a", "b", None, "d"], row_group_size=2)
    with pytest.raises(DataError) as e:
        list(read_file(q))
    assert str(e.value) == f"{q}[row 2]: data.text_field='text' is null, not a string"


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_parquet_is_one_line_naming_the_file(tmp_path, keep):
    full = write_parquet(tmp_path / "full.parquet", [f"{TEXT} {i}" for i in range(3000)])
    p = tmp_path / "cut.parquet"
    p.write_bytes(full.read_bytes()[: int(full.stat().st_size * keep)])
    with pytest.raises(DataError) as e:
        list(read_file(p))
    assert str(e.value).startswith(f"{p}: cannot be read as Parquet (") and "\n" not in str(e.value)


def test_not_parquet_is_one_line(tmp_path):
    p = tmp_path / "fake.parquet"
    p.write_text("just text")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot be read as Parquet"):
        list(read_file(p))


def test_empty_parquet_counted_and_directory_mixes_formats(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_parquet(d / "a.parquet", ["p1", "p2"])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "b.parquet")
    (d / "c.jsonl.zst").write_bytes(zstandard.compress(jsonl(2)))
    (d / "e.csv.gz").write_bytes(b"")
    files, skipped = find_files([d])
    assert [f.name for f in files] == ["a.parquet", "b.parquet", "c.jsonl.zst"]
    assert skipped == [{"path": str(d / "e.csv.gz"), "reason": "unsupported file type"}]
    stats = SourceStats()
    assert list(read_documents(files, stats=stats)) == ["p1", "p2", f"{TEXT} (0).", f"{TEXT} (1)."]
    assert stats.files == 3 and stats.empty_files == 1


def test_a_missing_package_is_one_line(tmp_path):
    """Without pyarrow (or zstandard) the user is told which extra to install, not shown an ImportError."""
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['zstandard'] = None\n"
        "from datamodules.sources import read_file\n"
        "for name in ('x.parquet', 'x.jsonl.zst'):\n"
        "    open(name, 'wb').write(b'PAR1')\n"
        "    try: list(read_file(name))\n"
        "    except Exception as e: print(type(e).__name__, e)\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.splitlines() == [
        'DataError reading .parquet files needs pyarrow: pip install -e ".[data]" (or pip install pyarrow)',
        'DataError reading .zst files needs the zstandard package: pip install -e ".[data]" (or pip install zstandard)',
    ], out.stderr
