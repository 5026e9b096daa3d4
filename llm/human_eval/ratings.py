"""The ratings of a study: ``ratings.jsonl``, append-only, one JSON object a line, durable before acknowledged.

Each rating is written with one ``write`` and fsynced before ``add`` returns (and so before the server replies): a
process killed at any moment has lost no rating it acknowledged. A kill (or a power cut) in the middle of a write
can leave a torn last line without its newline; reading ignores it, and the store cuts it off before appending, so
the file stays one rating a line. A bad line elsewhere is not a torn write: it is an error naming the line.

One rating per rater and item: a repeated post (a retried request, a second tab) is answered but not stored again;
the first one counts.

A line: ``{"item", "rater", "choice": "left"|"right"|"tie", "left": "a"|"b", "winner": "a"|"b"|"tie", "score": 1-5
or null, "comment": str or null, "time": ISO 8601}``; ``left`` is the side the rater saw on the left.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import UserError

RATINGS_FILE = "ratings.jsonl"
CHOICES = ("left", "right", "tie")


def read_ratings(path: str | Path) -> list[dict[str, Any]]:
    """The ratings of ``path`` (none when it does not exist), first of each (rater, item) only."""
    return list(_dedupe(_lines(Path(path))[0]))


def _lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the ratings, the byte length of the complete lines: where a torn last line starts)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline: a torn write, never acknowledged
    out = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rating = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}:{lineno}: not a rating ({err}); only a torn last line is skipped") from err
        if not isinstance(rating, dict) or not isinstance(rating.get("item"), str) or "rater" not in rating:
            raise UserError(f"{path}:{lineno}: not a rating (needs 'item' and 'rater')")
        out.append(rating)
    return out, end


def _dedupe(ratings: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    for r in ratings:
        key = (r["rater"], r["item"])
        if key not in seen:
            seen.add(key)
            yield r


class RatingStore:
    """``ratings.jsonl`` opened for appending, with the set of (rater, item) already rated. Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ratings, end = _lines(self.path)
        self._lock = threading.Lock()
        self.ratings = list(_dedupe(ratings))
        self._rated = {(r["rater"], r["item"]) for r in self.ratings}
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size > end:  # a torn last line: cut it, so the next rating starts a line
            os.truncate(self.path, end)
            os.fsync(self._fd)
        if created:  # the new file's directory entry must survive a crash too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def rated(self, rater: str) -> set[str]:
        """The items ``rater`` has rated."""
        with self._lock:
            return {item for r, item in self._rated if r == rater}

    def add(self, rating: dict[str, Any]) -> bool:
        """Append ``rating`` and fsync; False (nothing written) when its rater already rated its item."""
        key = (rating["rater"], rating["item"])
        line = (json.dumps(rating, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if key in self._rated:
                return False
            written = os.write(self._fd, line)
            if written != len(line):  # a full disk: cut what was written, so the file stays whole
                os.truncate(self.path, os.fstat(self._fd).st_size - written)
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
            self._rated.add(key)
            self.ratings.append(rating)
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> RatingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
