"""Reading documents (a corpus) or JSON records (an example set) from files, directories and globs, streamed.

Formats, chosen by the file name (the first three also compressed, as ``.gz`` or ``.zst``):

- ``.txt``   one document per file, or one per paragraph (runs of blank lines) with ``split_paragraphs``;
- ``.jsonl`` one JSON object per line, the document in ``text_field``;
- ``.json``  a list of objects (or of strings), or a single object, the document in ``text_field``;
- ``.parquet`` one document per row, in the string column ``text_field`` (:mod:`datamodules.parquet`);
- a bare ``.zst`` is JSON Lines, as The Pile and SlimPajama name their files.

Zstandard is streamed by :mod:`datamodules.zstd` (``pip install zstandard``), Parquet read by pyarrow: both are
the ``data`` extra.

Reading streams: a ``.txt`` or ``.jsonl`` file is read line by line and a ``.json`` list element by element,
so memory holds one document at a time, whatever the size of the corpus. :func:`read_documents` yields the
documents of a corpus; :func:`read_records` yields the JSON objects of an example set (SFT, classification)
whole, read, sniffed, decoded and counted the same way.

Text is UTF-8 (a UTF-16 or UTF-32 file with a byte-order mark is decoded as such). Bytes that are not valid
UTF-8 are replaced by U+FFFD and counted, never an error; a leading byte-order mark is dropped. Line endings
are left alone: normalising them is a cleaning rule. A file that is not text at all (NUL bytes, or mostly
undecodable or control bytes in its first 8 KiB: an image, an archive, random bytes named ``.txt``) is
skipped, with the reason, in :attr:`SourceStats.skipped_files`.

Mistakes of the user (a missing path, a glob that matches nothing, a wrong ``text_field`` or a missing Parquet
column, invalid JSON, a truncated ``.gz``, ``.zst`` or ``.parquet``) raise :class:`DataError` with a one-line
message that names the path or key.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from datamodules.jsonstream import json_values
from datamodules.parquet import read_parquet
from datamodules.zstd import open_zstd
from llm.errors import DataError  # noqa: F401  (re-exported: the data package's one error type)

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".zst")  # of .txt, .jsonl and .json
SUPPORTED = ".txt, .jsonl, .json (and .gz or .zst of them), .parquet"  # for messages
CORPORA = Path(__file__).resolve().parent / "corpora"  # the embedded data sets and their licence
EMBEDDED_CORPUS = CORPORA / "janeausten.jsonl.gz"

SNIFF_BYTES = 8192  # how much of a file (decompressed) decides whether it is text
MAX_BAD_RATIO = 0.3  # more undecodable or control bytes than this among the sniffed characters: not text

T = TypeVar("T")

_BOM = "\ufeff"
_REPLACEMENT = "\ufffd"
_GLOB_CHARS = set("*?[")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape lone surrogates, which are not text
# C0 control characters that do not occur in text files (tab, newlines, form feed and escape do)
_BINARY_CONTROLS = re.compile("[\x01-\x08\x0e-\x1a\x1c-\x1f]")

# BOMs that select a decoder; the longer UTF-32 marks first (FF FE 00 00 starts with UTF-16's FF FE).
_BOM_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class SourceStats:
    """What reading saw: files and (decompressed) bytes read, invalid UTF-8 replaced, files empty or skipped (with the reason)."""

    files: int = 0
    bytes: int = 0
    documents: int = 0
    invalid_utf8_replacements: int = 0
    empty_files: int = 0
    disk_bytes: int = 0  # bytes of the files as stored (compressed for .gz / .zst) read so far: for progress bars
    skipped_files: list[dict[str, str]] = field(default_factory=list)


# Decoding errors are replaced by U+FFFD (as errors="replace" does) and counted here. Reading is single-threaded
# per process, so a module-level counter is enough; read_file() adds the difference to its SourceStats.
_invalid = [0]


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _invalid[0] += 1
    return _REPLACEMENT, err.end


codecs.register_error("datamodules.replace", _replace_and_count)


def compression(path: str | Path) -> str | None:
    """``"gz"``, ``"zst"`` or None, from the name."""
    name = Path(path).name.lower()
    return next((c[1:] for c in COMPRESSIONS if name.endswith(c)), None)


def file_format(path: str | Path) -> str | None:
    """``"txt"``, ``"jsonl"``, ``"json"`` or ``"parquet"`` from the name (the first three ``.gz`` or ``.zst``
    too; a bare ``.zst`` is JSON Lines), None if not supported."""
    name = Path(path).name.lower()
    packed = compression(name)
    if packed is not None:
        name = name[: -len(packed) - 1]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return None if packed and suffix == ".parquet" else suffix[1:]  # Parquet compresses inside
    return "jsonl" if packed == "zst" else None  # a bare .zst: JSON Lines


def find_files(paths: Iterable[str | Path], key: str = "data.paths") -> tuple[list[Path], list[dict[str, str]]]:
    """Expand files, directories (recursively) and globs into the readable files, in a stable order.

    ``key`` is the setting the paths came from, named in the errors.

    Returns ``(files, skipped)``: unsupported or hidden files found inside directories and globs are
    skipped with a reason; a named file that does not exist or has an unsupported format is an error.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path, named: bool) -> None:
        if file_format(p) is None:
            if named:
                raise DataError(f"{key}: {p} is not a supported file (expected {SUPPORTED})")
            skipped.append({"path": str(p), "reason": "unsupported file type"})
            return
        resolved = p.resolve()
        if resolved not in seen:
            seen.add(resolved)
            files.append(p)

    def add_dir(d: Path) -> None:
        for root, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in sorted(filenames):
                p = Path(root) / name
                if name.startswith("."):
                    skipped.append({"path": str(p), "reason": "hidden file"})
                else:
                    add(p, named=False)

    if isinstance(paths, (str, Path)):
        paths = [paths]
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if _GLOB_CHARS & set(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"{key}: the glob {entry!r} matches no file")
            for m in matches:
                p = Path(m)
                if p.is_dir():
                    add_dir(p)
                else:
                    add(p, named=False)
        else:
            p = Path(entry)
            if p.is_dir():
                add_dir(p)
            elif p.is_file():
                add(p, named=True)
            else:
                raise DataError(f"{key}: {entry} does not exist")
    return files, skipped


# ---------------------------------------------------------------------------------------------------------
# Opening and sniffing


def _decompressed(raw: IO[bytes], path: Path) -> IO[bytes]:
    """The file's bytes as text is read from them: ``raw`` itself, or its gzip / zstd stream."""
    packed = compression(path)
    if packed == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if packed == "zst":
        return open_zstd(raw)
    return raw


def sniff(head: bytes) -> tuple[str, str | None]:
    """``(encoding, reason)`` for the first bytes of a file: the decoder to use, and why it is not text (or None).

    A byte-order mark selects UTF-8, UTF-16 or UTF-32; without one the text must be UTF-8. NUL bytes never occur
    in UTF-8 text, and a file whose sniffed characters are more than :data:`MAX_BAD_RATIO` undecodable bytes or
    control characters is binary, or text in a legacy encoding that would decode to garbage.
    """
    for bom, encoding in _BOM_ENCODINGS:
        if head.startswith(bom):
            return encoding, None
    if b"\x00" in head:
        return "utf-8-sig", "binary file (NUL bytes)"
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if text:
        bad = text.count(_REPLACEMENT) - head.count(b"\xef\xbf\xbd") + len(_BINARY_CONTROLS.findall(text))
        if bad / len(text) > MAX_BAD_RATIO:
            pct = round(100 * bad / len(text))
            return "utf-8-sig", f"binary or not UTF-8 ({pct}% of the first {len(head)} bytes undecodable or control)"
    return "utf-8-sig", None


def _open_text(raw: IO[bytes], path: Path, encoding: str) -> io.TextIOWrapper:
    """The file (decompressed) as text: invalid bytes replaced and counted, line endings untouched."""
    return io.TextIOWrapper(_decompressed(raw, path), encoding=encoding, errors="datamodules.replace", newline="")


# ---------------------------------------------------------------------------------------------------------
# Formats


def split_into_paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into paragraphs separated by one or more blank (whitespace-only) lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block = []
    if block:
        yield "".join(block)


def _field(record: object, text_field: str, where: str, stats: SourceStats) -> str:
    value = _text_of(record, text_field, where)
    if _SURROGATE.search(value):
        value, n = _SURROGATE.subn(_REPLACEMENT, value)
        stats.invalid_utf8_replacements += n
    return value


def _text_of(record: object, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with key {text_field!r}, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10])
        raise DataError(f"{where}: no key data.text_field={text_field!r} (keys: {keys})")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: data.text_field={text_field!r} is {type(value).__name__}, not a string")
    return value


def _lines(f: io.TextIOWrapper) -> Iterator[str]:
    first = True
    for line in f:
        if first:
            line = line.removeprefix(_BOM)  # utf-16 and utf-32 keep the mark in the text
            first = False
        yield line


def _read_txt(f: io.TextIOWrapper, split_paragraphs: bool) -> Iterator[str]:
    if split_paragraphs:
        yield from split_into_paragraphs(_lines(f))
    else:
        text = "".join(_lines(f))
        if text:
            yield text


def _jsonl_values(f: io.TextIOWrapper, path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of every non-blank line."""
    for lineno, line in enumerate(_lines(f), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def _read_jsonl(f: io.TextIOWrapper, path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    for lineno, record in _jsonl_values(f, path):
        yield _field(record, text_field, f"{path}:{lineno}", stats)


def _records(f: io.TextIOWrapper, path: Path, fmt: str, stats: SourceStats) -> Iterator[tuple[str, dict[str, object]]]:
    if fmt == "jsonl":
        values: Iterator[tuple[str, object]] = ((f"{path}:{lineno}", value) for lineno, value in _jsonl_values(f, path))
    else:
        values = ((str(path) if i is None else f"{path}[{i}]", value) for i, value in json_values(f, path))
    for where, value in values:
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, _replace_surrogates(value, stats)


def _replace_surrogates(value: object, stats: SourceStats) -> Any:
    """``value`` with lone surrogates (which JSON may escape, but are not text) in its strings replaced, counted."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            value, n = _SURROGATE.subn(_REPLACEMENT, value)
            stats.invalid_utf8_replacements += n
        return value
    if isinstance(value, dict):
        return {k: _replace_surrogates(v, stats) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(v, stats) for v in value]
    return value


def _documents(
    f: io.TextIOWrapper, path: Path, fmt: str, text_field: str, split_paragraphs: bool, stats: SourceStats
) -> Iterator[str]:
    if fmt == "txt":
        yield from _read_txt(f, split_paragraphs)
        return
    if fmt == "jsonl":
        docs = _read_jsonl(f, path, text_field, stats)
    else:
        docs = (
            _field(value, text_field, str(path) if i is None else f"{path}[{i}]", stats)
            for i, value in json_values(f, path)
        )
    for doc in docs:
        if split_paragraphs:
            yield from split_into_paragraphs(doc.splitlines(keepends=True))
        else:
            yield doc


def read_file(
    path: str | Path, text_field: str = "text", split_paragraphs: bool = False, stats: SourceStats | None = None
) -> Iterator[str]:
    """The documents of one file. ``split_paragraphs`` splits every document on runs of blank lines.

    A file that is not text is skipped (recorded in ``stats.skipped_files``); one without documents is
    counted in ``stats.empty_files``.
    """
    path = Path(path)
    stats = stats if stats is not None else SourceStats()
    fmt = file_format(path)
    if fmt is None:
        raise DataError(f"data.paths: {path} is not a supported file (expected {SUPPORTED})")
    if fmt == "parquet":
        for doc in read_parquet(path, text_field, stats):
            if split_paragraphs:
                yield from split_into_paragraphs(doc.splitlines(keepends=True))
            else:
                yield doc
        return
    yield from _stream(path, stats, lambda f: _documents(f, path, fmt, text_field, split_paragraphs, stats))


def read_records(
    files: Iterable[str | Path], stats: SourceStats | None = None
) -> Iterator[tuple[str, dict[str, object]]]:
    """``(where, record)`` for every JSON object of ``.jsonl`` / ``.json`` files (``.gz`` too), streamed: the rows
    of example sets. ``where`` is ``file:line`` (JSON Lines), ``file[i]`` (a JSON list) or the file (one object).

    Files are opened, sniffed, decoded and counted in ``stats`` as :func:`read_file` does: a file that is not
    text is skipped (in ``stats.skipped_files``), one without rows is counted in ``stats.empty_files``, and
    ``stats.documents`` counts the rows.
    """
    stats = stats if stats is not None else SourceStats()
    for path in files:
        path = Path(path)
        fmt = file_format(path)
        if fmt not in ("jsonl", "json"):
            raise DataError(
                f"data.paths: {path} is not JSON Lines or JSON (examples need .jsonl, .json or .gz of them)"
            )
        yield from _stream(path, stats, lambda f, path=path, fmt=fmt: _records(f, path, fmt, stats))


def unread(stats: SourceStats) -> list[str]:
    """Why reading gave nothing, for an error message: the empty files, and the files skipped as not text."""
    skipped = [s for s in stats.skipped_files if s["reason"] not in ("hidden file", "unsupported file type")]
    parts = []
    if stats.empty_files:
        parts.append(f"{stats.empty_files} empty file{'s' * (stats.empty_files != 1)}")
    if skipped:
        first = skipped[0]
        parts.append(f"{len(skipped)} skipped, e.g. {first['path']}: {first['reason']}")
    return parts


def _stream(path: Path, stats: SourceStats, items: Callable[[io.TextIOWrapper], Iterator[T]]) -> Iterator[T]:
    """``items`` of the file opened as text: sniffed first (a file that is not text is skipped, with the reason),
    decompressed, decoded; what was read is counted in ``stats``, and an unreadable file is a DataError."""
    invalid_before = _invalid[0]
    n_items = 0
    try:
        with open(path, "rb") as raw, _decompressed(raw, path) as unpacked:
            head = unpacked.read(SNIFF_BYTES)
        encoding, reason = sniff(head)
        if reason is not None:
            stats.skipped_files.append({"path": str(path), "reason": reason})
            return
        stats.files += 1
        with open(path, "rb") as raw, _open_text(raw, path, encoding) as f:
            disk_before = stats.disk_bytes
            for item in items(f):
                n_items += 1
                stats.documents += 1
                stats.disk_bytes = disk_before + raw.tell()
                yield item
            stats.bytes += f.buffer.tell()
            stats.disk_bytes = disk_before + raw.tell()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz / .zst, unreadable file
        raise DataError(f"{path}: cannot be read ({_reason(e)})") from None
    finally:  # (documents of two files read interleaved would share their counts)
        stats.invalid_utf8_replacements += _invalid[0] - invalid_before
    if n_items == 0:
        stats.empty_files += 1


def _reason(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "truncated: the compressed stream ends early"
    msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return msg.splitlines()[0] if msg else type(e).__name__


def read_documents(
    files: Iterable[str | Path],
    text_field: str = "text",
    split_paragraphs: bool = False,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Stream the documents of ``files`` in order (see :func:`find_files` to expand paths)."""
    stats = stats if stats is not None else SourceStats()
    for path in files:
        yield from read_file(path, text_field, split_paragraphs, stats)
