"""Reading documents from files, directories and globs, streamed one document at a time.

Formats, chosen by the file name (each also as ``.gz``):

- ``.txt``   one document per file, or one per paragraph (runs of blank lines) with ``split_paragraphs``;
- ``.jsonl`` one JSON object per line, the document in ``text_field``;
- ``.json``  a list of objects (or of strings), or a single object, the document in ``text_field``.

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted, never an error; a leading byte-order
mark is dropped. Line endings are left alone: normalising them is a cleaning rule. Mistakes of the user
(a missing path, a glob that matches nothing, a wrong ``text_field``) raise :class:`DataError` with a
one-line message that names the path or key.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SUFFIXES = (".txt", ".jsonl", ".json")
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpora" / "janeausten.jsonl.gz"

_BOM = "\ufeff"
_REPLACEMENT = "\ufffd"
_GLOB_CHARS = set("*?[")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape lone surrogates, which are not text


class DataError(ValueError):
    """A mistake in the data or its configuration; the message is one line naming the file, key or value."""


@dataclass
class SourceStats:
    """What reading saw: files and bytes read, invalid UTF-8 replaced, files skipped (with the reason)."""

    files: int = 0
    bytes: int = 0
    documents: int = 0
    invalid_utf8_replacements: int = 0
    skipped_files: list[dict[str, str]] = field(default_factory=list)


def file_format(path: str | Path) -> str | None:
    """``"txt"``, ``"jsonl"`` or ``"json"`` from the name (``.gz`` allowed), None if not supported."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand files, directories (recursively) and globs into the readable files, in a stable order.

    Returns ``(files, skipped)``: unsupported or hidden files found inside directories and globs are
    skipped with a reason; a named file that does not exist or has an unsupported format is an error.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path, named: bool) -> None:
        if file_format(p) is None:
            if named:
                raise DataError(
                    f"data.paths: {p} is not a supported file (expected {', '.join(SUFFIXES)} or .gz of them)"
                )
            skipped.append({"path": str(p), "reason": "unsupported file type"})
            return
        key = p.resolve()
        if key not in seen:
            seen.add(key)
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
                raise DataError(f"data.paths: the glob {entry!r} matches no file")
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
                raise DataError(f"data.paths: {entry} does not exist")
    return files, skipped


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, stats: SourceStats) -> str:
    """UTF-8 with invalid bytes replaced by U+FFFD; the number of replacements is added to ``stats``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD that was already in the file (valid UTF-8 EF BF BD) is not a replacement
        stats.invalid_utf8_replacements += text.count(_REPLACEMENT) - raw.count(b"\xef\xbf\xbd")
        return text


def _lines(path: Path, stats: SourceStats) -> Iterator[str]:
    """Decoded lines of a file (with their line ending), BOM dropped, counting bytes read."""
    with _open_binary(path) as f:
        first = True
        for raw in f:
            stats.bytes += len(raw)
            line = _decode(raw, stats)
            if first:
                line = line.removeprefix(_BOM)
                first = False
            yield line


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


def _read_txt(path: Path, split_paragraphs: bool, stats: SourceStats) -> Iterator[str]:
    if split_paragraphs:
        yield from split_into_paragraphs(_lines(path, stats))
    else:
        text = "".join(_lines(path, stats))
        if text:
            yield text


def _read_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    for lineno, line in enumerate(_lines(path, stats), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        yield _field(record, text_field, f"{path}:{lineno}", stats)


def _read_json(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    text = "".join(_lines(path, stats))  # one JSON value: the standard library cannot stream it
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, list):
        for i, record in enumerate(data):
            yield _field(record, text_field, f"{path}[{i}]", stats)
    else:
        yield _field(data, text_field, str(path), stats)


def read_file(
    path: str | Path, text_field: str = "text", split_paragraphs: bool = False, stats: SourceStats | None = None
) -> Iterator[str]:
    """The documents of one file. ``split_paragraphs`` splits every document on runs of blank lines."""
    path = Path(path)
    stats = stats if stats is not None else SourceStats()
    fmt = file_format(path)
    stats.files += 1
    if fmt == "txt":
        docs = _read_txt(path, split_paragraphs, stats)
        split_paragraphs = False  # already split while streaming
    elif fmt == "jsonl":
        docs = _read_jsonl(path, text_field, stats)
    elif fmt == "json":
        docs = _read_json(path, text_field, stats)
    else:
        raise DataError(f"data.paths: {path} is not a supported file (expected {', '.join(SUFFIXES)} or .gz of them)")
    try:
        for doc in docs:
            if split_paragraphs:
                for para in split_into_paragraphs(doc.splitlines(keepends=True)):
                    stats.documents += 1
                    yield para
            else:
                stats.documents += 1
                yield doc
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz, unreadable file
        raise DataError(f"{path}: cannot be read ({e})") from None


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
