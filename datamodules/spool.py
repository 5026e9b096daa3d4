"""The spool: the cleaned documents on disk between cleaning and encoding, so that memory stays bounded.

The documents are stored as UTF-8 one after another in one file, with their sizes in bytes kept in memory
(8 bytes per document). Tokenizer training reads them back in order (:meth:`Spool.docs`); encoding reads runs of
them by byte offset (:func:`chunks`, :func:`read_docs`), in this process or in worker processes that open the
file themselves.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

READ_BYTES = 1 << 18  # UTF-8 bytes read at a time by Spool.docs


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.sizes = array.array("q")

    def write_all(self, docs: Iterable[str]) -> None:
        with open(self.path, "wb") as f:
            for doc in docs:
                raw = doc.encode("utf-8", "replace")  # (a lone surrogate would become "?")
                f.write(raw)
                self.sizes.append(len(raw))

    def sizes_array(self) -> np.ndarray:
        """The documents' sizes in bytes, in order."""
        return np.frombuffer(self.sizes, dtype=np.int64) if len(self.sizes) else np.zeros(0, dtype=np.int64)

    def docs(self) -> Iterator[str]:
        """Every document, in order."""
        sizes = self.sizes_array()
        with open(self.path, "rb") as f:
            for first, end, offset in chunks(sizes, READ_BYTES):
                yield from read_docs(f, offset, sizes[first:end])


def chunks(sizes: np.ndarray, max_bytes: int) -> Iterator[tuple[int, int, int]]:
    """``(first_doc, end_doc, byte_offset)`` of consecutive runs of documents of about ``max_bytes``."""
    offset = first = acc = 0
    for i, n in enumerate(sizes.tolist()):
        acc += n
        if acc >= max_bytes:
            yield first, i + 1, offset
            first, offset, acc = i + 1, offset + acc, 0
    if first < len(sizes):
        yield first, len(sizes), offset


def read_docs(f: IO[bytes], offset: int, sizes: np.ndarray) -> list[str]:
    """The documents of byte ``sizes`` stored from ``offset`` on."""
    f.seek(offset)
    raw = f.read(int(sizes.sum()))
    ends = np.cumsum(sizes).tolist()
    starts = [0, *ends[:-1]]
    return [raw[a:b].decode("utf-8") for a, b in zip(starts, ends)]
