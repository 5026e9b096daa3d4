"""Cleaning: named rules, each a small function, applied in the configured order, with a report.

A rule is either a *normaliser* (``str -> str``: it changes the text) or a *filter* (``str -> bool``:
False drops the document). The list comes from the config, one dict per rule, its name plus keyword
parameters::

    cleaning:
      - {name: nfc}
      - {name: min_chars, value: 32}

The :class:`Cleaner` counts documents and characters read and kept and, per rule, the documents it
changed or dropped, with a few truncated examples of what each filter dropped; that becomes the
``rules`` part of ``data_report.json``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules.sources import DataError

MAX_EXAMPLES = 5
EXAMPLE_CHARS = 200

# ---------------------------------------------------------------------------------------------------------
# Normalisers: str -> str


def nfc(text: str, form: str = "NFC") -> str:
    """Unicode normalisation (NFC by default; ``form`` may be NFC, NFD, NFKC or NFKD)."""
    if unicodedata.is_normalized(form, text):  # fast path: most text already is
        return text
    return unicodedata.normalize(form, text)


# C0/C1 control characters except tab, newline and carriage return (the latter is whitespace's business),
# plus invisible characters that carry no meaning in running text. Zero-width (non-)joiners are kept:
# they matter in Persian, Indic scripts and emoji sequences.
_INVISIBLE = {0x200B, 0x2060, 0xFEFF, 0x00AD, 0x180E}
_CONTROL_TABLE = {c: None for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *_INVISIBLE] if c not in (9, 10, 13)}


_CONTROL_RE = re.compile("[" + re.escape("".join(map(chr, _CONTROL_TABLE))) + "]")


def control_chars(text: str) -> str:
    """Remove control characters (not tab or line breaks), zero-width spaces, soft hyphens and stray BOMs."""
    return text.translate(_CONTROL_TABLE) if _CONTROL_RE.search(text) else text  # searching is 3x cheaper


_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|\Z)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def whitespace(text: str) -> str:
    """CRLF and lone CR to LF, no trailing spaces on a line, at most one blank line in a row, stripped ends."""
    # each substitution only where its pattern occurs: substring tests are far cheaper than the regexes
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------------------
# Filters: str -> bool (True keeps the document)


def min_chars(text: str, value: int = 32) -> bool:
    """Keep documents of at least ``value`` characters."""
    return len(text) >= value


def max_chars(text: str, value: int = 10_000_000) -> bool:
    """Keep documents of at most ``value`` characters."""
    return len(text) <= value


def repeated_lines(text: str, max_ratio: float = 0.3, min_lines: int = 4) -> bool:
    """Keep documents where at most ``max_ratio`` of the non-empty lines repeat an earlier line.

    Boilerplate (menus, headers, spam) repeats lines; prose does not. Documents of fewer than
    ``min_lines`` non-empty lines are always kept.
    """
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) < min_lines:
        return True
    return (len(lines) - len(set(lines))) / len(lines) <= max_ratio


_ASCII_LETTERS = string.ascii_letters.encode("ascii")
_ASCII_SPACES = bytes(c for c in range(128) if chr(c).isspace())


def letter_ratio(text: str, min_ratio: float = 0.5) -> bool:
    """Keep documents where letters (any script: CJK counts) are at least ``min_ratio`` of the non-space chars."""
    if text.isascii():  # the common case, counted in C: delete the letters, or the spaces, from the bytes
        raw = text.encode("ascii")
        other = raw.translate(None, _ASCII_LETTERS)  # what is not a letter
        letters = len(raw) - len(other)
        total = letters + len(other.translate(None, _ASCII_SPACES))  # letters + other non-space
    else:
        letters = sum(map(str.isalpha, text))
        total = len("".join(text.split()))  # non-space characters (str.split splits on exactly str.isspace)
    return total > 0 and letters / total >= min_ratio


class Dedup:
    """Exact deduplication: keep the first document with a given content (8-byte BLAKE2b digest).

    Memory is 8 bytes per distinct document: the digests live in a sorted numpy array, with the latest ones in a
    small set merged into it every :attr:`MERGE_EVERY` documents. (With 64-bit digests, a corpus of a billion
    distinct documents has a ~3% chance that one of them is dropped for a collision.)
    """

    MERGE_EVERY = 1 << 16

    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._sorted = np.zeros(0, dtype=np.uint64)

    def __call__(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return self.admit(int.from_bytes(digest, "little"))

    def admit(self, key: int) -> bool:
        """Whether a document with this digest is new (then it is remembered)."""
        if key in self._recent:
            return False
        if len(self._sorted):
            i = int(self._sorted.searchsorted(np.uint64(key)))
            if i < len(self._sorted) and int(self._sorted[i]) == key:
                return False
        self._recent.add(key)
        if len(self._recent) >= self.MERGE_EVERY:
            new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            # two sorted runs: the stable sort (timsort) merges them in linear time
            self._sorted = np.sort(np.concatenate([self._sorted, np.sort(new)]), kind="stable")
            self._recent.clear()
        return True


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` that best separate pairs above and below ``threshold``.

    Two documents of Jaccard similarity ``s`` share at least one band with probability ``1 - (1 - s**r)**b``.
    The choice minimises the area of false candidates below the threshold plus missed pairs above it.
    """
    s = np.linspace(0.0, 1.0, 1001)
    below, above = s < threshold, s >= threshold
    best: tuple[float, int, int] | None = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1.0 - (1.0 - s**rows) ** bands
        error = p[below].sum() + (1.0 - p[above]).sum()
        if best is None or error < best[0]:
            best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


class NearDedup:
    """Near-duplicate removal with MinHash and LSH: drop a document whose estimated Jaccard similarity to a
    document kept earlier is at least ``threshold``.

    A document is the set of its ``shingle``-character substrings (after lower-casing and collapsing
    whitespace: characters, not words, so it works for scripts without spaces too). Its signature is the minimum
    of ``num_perm`` random hash functions over that set; two signatures agree in a position with probability
    equal to the sets' Jaccard similarity. Signatures are cut into ``bands`` bands (chosen by :func:`lsh_bands`
    when None); documents sharing a band are candidates, and a candidate counts as a duplicate when the
    fraction of equal signature positions reaches ``threshold``. Memory: the signature of every kept document
    (``4 * num_perm`` bytes) plus one bucket entry per band.
    """

    _P = 0x100000001B3  # polynomial base for the shingle hash (odd; arithmetic wraps modulo 2**64)
    _CHUNK = 2048  # shingles hashed at once: a (num_perm, chunk) block of uint64

    def __init__(self, num_perm: int = 128, threshold: float = 0.8, shingle: int = 5, bands: int | None = None):
        if int(num_perm) < 2:
            raise ValueError(f"num_perm={num_perm} must be at least 2")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if int(shingle) < 1:
            raise ValueError(f"shingle={shingle} must be at least 1")
        self.num_perm, self.threshold, self.shingle = int(num_perm), float(threshold), int(shingle)
        if bands is None:
            self.bands, self.rows = lsh_bands(self.num_perm, self.threshold)
        else:
            if not 1 <= int(bands) <= self.num_perm:
                raise ValueError(f"bands={bands} must be between 1 and num_perm={self.num_perm}")
            self.bands, self.rows = int(bands), self.num_perm // int(bands)
        rng = np.random.default_rng(0x5EED)  # fixed: the same corpus always gives the same result
        self._a = rng.integers(0, 2**64, size=(self.num_perm, 1), dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**64, size=(self.num_perm, 1), dtype=np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((64, self.num_perm), dtype=np.uint32)
        self._n = 0

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the distinct ``shingle``-character substrings of the normalised text."""
        norm = " ".join(text.lower().split())
        cp = np.frombuffer(norm.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        if len(cp) == 0:
            cp = np.zeros(1, dtype=np.uint64)
        k = min(self.shingle, len(cp))
        n = len(cp) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # h = sum(cp[i + j] * P**(k - 1 - j)), wrapping
            h = h * np.uint64(self._P) + cp[j : j + n]
        # splitmix64's finaliser: every input bit reaches the top 32 bits kept below
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
        return np.unique(h >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature, ``num_perm`` uint32: hash ``i`` is ``(a_i * x + b_i) mod 2**64 >> 32``."""
        x = self.shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for i in range(0, len(x), self._CHUNK):
            block = (self._a * x[None, i : i + self._CHUNK] + self._b) >> np.uint64(32)  # (num_perm, chunk)
            np.minimum(sig, block.min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def __call__(self, text: str) -> bool:
        return self.admit(self.signature(text))

    def admit(self, sig: np.ndarray) -> bool:
        """Whether a document with this signature is no near-duplicate of one admitted before (then it is kept)."""
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for bucket, key in zip(self._buckets, keys) for j in bucket.get(key, ())}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            if (self._sigs[idx] == sig).mean(axis=1).max() >= self.threshold:
                return False
        if self._n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[self._n] = sig
        for bucket, key in zip(self._buckets, keys):
            bucket.setdefault(key, []).append(self._n)
        self._n += 1
        return True


NORMALISERS: dict[str, Callable[..., str]] = {"nfc": nfc, "control_chars": control_chars, "whitespace": whitespace}
FILTERS: dict[str, Callable[..., bool]] = {
    "min_chars": min_chars,
    "max_chars": max_chars,
    "repeated_lines": repeated_lines,
    "letter_ratio": letter_ratio,
}
# Filters that remember the documents before: a new one for every Cleaner, built with the rule's parameters.
STATEFUL_FILTERS: dict[str, Callable[..., Callable[[str], bool]]] = {"dedup": Dedup, "near_dedup": NearDedup}
RULE_NAMES = (*NORMALISERS, *FILTERS, *STATEFUL_FILTERS)
OPTIONAL_RULES = ("near_dedup",)  # off unless configured: slower, and a matter of taste

DEFAULT_RULES: list[dict[str, Any]] = [
    {"name": "nfc"},
    {"name": "control_chars"},
    {"name": "whitespace"},
    {"name": "min_chars", "value": 32},
    {"name": "max_chars", "value": 10_000_000},
    {"name": "repeated_lines", "max_ratio": 0.3},
    {"name": "letter_ratio", "min_ratio": 0.5},
    {"name": "dedup"},
]


# ---------------------------------------------------------------------------------------------------------
# The cleaner


def normalize_rules(rules: Iterable[Mapping[str, Any] | str] | None) -> list[dict[str, Any]]:
    """Rule specs as plain dicts (``"nfc"`` is short for ``{"name": "nfc"}``); None gives the defaults."""
    if rules is None:
        return [dict(r) for r in DEFAULT_RULES]
    out = []
    for i, spec in enumerate(rules):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise DataError(f"data.cleaning[{i}]: expected a mapping with a 'name' key, got {spec!r}")
        out.append({str(k): v for k, v in spec.items()})
    return out


@dataclass
class _Rule:
    name: str
    fn: Callable[[str], Any]
    is_filter: bool
    dropped: int = 0
    changed: int = 0
    examples: list[str] = field(default_factory=list)


def _check_params(name: str, accepted: list[str], params: dict[str, Any], where: str) -> None:
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(
            f"{where}: rule {name!r} has no parameter {unknown[0]!r} (accepted: {', '.join(accepted) or 'none'})"
        )


def _bind(name: str, fn: Callable[..., Any], params: dict[str, Any], where: str) -> Callable[[str], Any]:
    """``fn`` with its parameters bound, after checking their names against its signature."""
    _check_params(name, list(inspect.signature(fn).parameters)[1:], params, where)
    if not params:
        return fn
    return functools.partial(fn, **params)  # (a partial is called in C: cheaper than a lambda)


def _build_stateful(name: str, factory: Callable[..., Any], params: dict[str, Any], where: str) -> Any:
    _check_params(name, list(inspect.signature(factory).parameters), params, where)
    try:
        return factory(**params)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: rule {name!r}: {e}") from None


class Cleaner:
    """Applies a list of rules to a stream of documents and counts what each rule did."""

    def __init__(self, rules: Iterable[Mapping[str, Any] | str] | None = None) -> None:
        self.config = normalize_rules(rules)
        self.rules: list[_Rule] = []
        names = set()
        for i, spec in enumerate(self.config):
            params = dict(spec)
            name = str(params.pop("name"))
            where = f"data.cleaning[{i}]"
            if name in names:
                raise DataError(f"{where}: rule {name!r} is listed twice")
            names.add(name)
            if name in NORMALISERS:
                if name == "nfc" and params.get("form", "NFC") not in ("NFC", "NFD", "NFKC", "NFKD"):
                    raise DataError(f"{where}: nfc form must be NFC, NFD, NFKC or NFKD, got {params['form']!r}")
                self.rules.append(_Rule(name, _bind(name, NORMALISERS[name], params, where), is_filter=False))
            elif name in FILTERS:
                self.rules.append(_Rule(name, _bind(name, FILTERS[name], params, where), is_filter=True))
            elif name in STATEFUL_FILTERS:
                fn = _build_stateful(name, STATEFUL_FILTERS[name], params, where)
                self.rules.append(_Rule(name, fn, is_filter=True))
            else:
                raise DataError(f"{where}: unknown cleaning rule {name!r} (known: {', '.join(RULE_NAMES)})")
        self.docs_read = self.docs_kept = 0
        self.chars_read = self.chars_kept = 0

    def clean(self, text: str) -> str | None:
        """The cleaned document, or None if a filter dropped it."""
        self.docs_read += 1
        self.chars_read += len(text)
        for rule in self.rules:
            if rule.is_filter:
                if not rule.fn(text):
                    rule.dropped += 1
                    if len(rule.examples) < MAX_EXAMPLES:
                        ex = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."
                        rule.examples.append(ex)
                    return None
            else:
                new = rule.fn(text)
                if new != text:
                    rule.changed += 1
                    text = new
        self.docs_kept += 1
        self.chars_kept += len(text)
        return text

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            out = self.clean(doc)
            if out is not None:
                yield out

    @property
    def docs_dropped(self) -> int:
        return self.docs_read - self.docs_kept

    def report(self) -> dict[str, Any]:
        """Counts for ``data_report.json``: documents, characters and, per rule, dropped / changed / examples."""
        return {
            "documents": {"read": self.docs_read, "kept": self.docs_kept, "dropped": self.docs_dropped},
            "characters": {"read": self.chars_read, "kept": self.chars_kept},
            "rules": {
                r.name: {"dropped": r.dropped, "changed": r.changed, "examples": list(r.examples)} for r in self.rules
            },
        }
