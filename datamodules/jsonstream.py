"""A top-level JSON list parsed one element at a time, so that a ``.json`` file of any size streams.

A plain ``json.load`` would hold the whole file and every parsed element in memory at once.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from llm.errors import DataError

JSON_CHUNK_CHARS = 1 << 20  # a .json file is parsed from chunks of this many characters
BOM = "\ufeff"
_WS = re.compile(r"[ \t\r\n]*")


def json_values(f: io.TextIOWrapper, path: Path) -> Iterator[tuple[int | None, object]]:
    """``(index, element)`` of a top-level JSON list, parsed one element at a time from chunks of the file, or
    ``(None, value)`` for any other top-level value (parsed whole). An element is only accepted once the ``,``
    or ``]`` after it has been read: a number cut at the end of a chunk would otherwise pass for a shorter one."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = f.read(JSON_CHUNK_CHARS)
        if not chunk:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def next_char() -> str:
        """The next non-whitespace character (reading more as needed); empty at the end of the file."""
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    def invalid(msg: str) -> DataError:
        return DataError(f"{path}: invalid JSON ({msg})")

    more()
    if buf.startswith(BOM):
        pos = 1
    if next_char() != "[":
        while more():
            pass
        try:
            yield None, json.loads(buf[pos:])
        except json.JSONDecodeError as e:
            raise invalid(f"{e.msg} at line {e.lineno}") from None
        return
    pos += 1
    index = 0
    c = next_char()
    if c == "]":
        pos += 1
    while c != "]":
        if not c:
            raise invalid(f"the list ends after {index} elements without ']'")
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if more():
                    continue
                raise invalid(f"{e.msg} in element {index}") from None
            if end < len(buf) or not more():
                break
        pos = end
        yield index, value
        index += 1
        c = next_char()
        if not c:
            raise invalid(f"the list ends after {index} elements without ']'")
        if c not in (",", "]"):
            raise invalid(f"expected ',' or ']' after element {index - 1}")
        pos += 1
        if c == ",":
            c = next_char()
            if c == "]":
                raise invalid(f"trailing comma after element {index - 1}")
    if next_char():
        raise invalid("extra data after the list")
