"""Zstandard-compressed files (``.zst``, ``.jsonl.zst``, ``.txt.zst``) read as a stream, truncation detected.

``zstandard``'s own ``stream_reader`` ends quietly when the input stops in the middle of a frame, which would
pass a truncated download off as a shorter corpus. :class:`ZstdReader` feeds the file to one decompression
object per frame and raises ``EOFError`` (what ``gzip`` raises for the same fault) when the file ends inside a
frame. Files of several frames (what ``zstd`` writes for concatenated inputs, and what parallel compressors
emit) are read frame after frame. Memory holds one compressed chunk and what it decompresses to.
"""

from __future__ import annotations

import io
from typing import IO

from llm.errors import DataError

READ_BYTES = 1 << 17  # compressed bytes read at a time
# Frames written with `zstd --long=31` (large corpora) need a window of up to 2 GiB; the library's default refuses
# anything above 128 MiB. The window is allocated only as large as the frame asks for.
MAX_WINDOW = 1 << 31


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise DataError(
            'reading .zst files needs the zstandard package: pip install -e ".[data]" (or pip install zstandard)'
        ) from None
    return zstandard


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd stream ``raw`` (an open binary file), read-only and forward-only."""

    def __init__(self, raw: IO[bytes]) -> None:
        zstandard = _zstandard()
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._error = zstandard.ZstdError
        self._obj = self._dctx.decompressobj()
        self._fed = False  # bytes of the current frame were given to self._obj
        self._pending = b""  # decompressed, not yet returned
        self._pos = 0  # decompressed bytes returned so far

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decompress more into ``_pending``; False at the clean end of the stream."""
        while not self._pending:
            if self._obj.eof:  # a frame ended: what follows it starts the next one
                rest = self._obj.unused_data
                self._obj, self._fed = self._dctx.decompressobj(), False
                if rest:
                    self._feed(rest)
                    continue
            chunk = self._raw.read(READ_BYTES)
            if not chunk:
                if self._fed and not self._obj.eof:
                    raise EOFError("truncated: the compressed stream ends early")
                return False
            self._feed(chunk)
        return True

    def _feed(self, chunk: bytes) -> None:
        try:
            self._pending = self._obj.decompress(chunk)
        except self._error as e:  # not zstd, or corrupt
            raise OSError(f"not a valid zstd stream ({e})") from None
        self._fed = True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if not self._pending and not self._fill():
            return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR and offset == 0:  # what BufferedReader.tell() asks
            return self._pos
        raise io.UnsupportedOperation("a zstd stream is read forward only")


def open_zstd(raw: IO[bytes]) -> io.BufferedReader:
    """A buffered reader of the decompressed stream of the open binary file ``raw``."""
    return io.BufferedReader(ZstdReader(raw), buffer_size=1 << 16)
