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

import hashlib
import inspect
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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


def control_chars(text: str) -> str:
    """Remove control characters (not tab or line breaks), zero-width spaces, soft hyphens and stray BOMs."""
    return text.translate(_CONTROL_TABLE)


_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|\Z)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def whitespace(text: str) -> str:
    """CRLF and lone CR to LF, no trailing spaces on a line, at most one blank line in a row, stripped ends."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
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


def letter_ratio(text: str, min_ratio: float = 0.5) -> bool:
    """Keep documents where letters (any script: CJK counts) are at least ``min_ratio`` of the non-space chars."""
    letters = other = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
        elif not ch.isspace():
            other += 1
    total = letters + other
    return total > 0 and letters / total >= min_ratio


class Dedup:
    """Exact deduplication: keep the first document with a given content (16-byte BLAKE2b digest)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True


NORMALISERS: dict[str, Callable[..., str]] = {"nfc": nfc, "control_chars": control_chars, "whitespace": whitespace}
FILTERS: dict[str, Callable[..., bool]] = {
    "min_chars": min_chars,
    "max_chars": max_chars,
    "repeated_lines": repeated_lines,
    "letter_ratio": letter_ratio,
}
STATEFUL_FILTERS: dict[str, Callable[[], Callable[[str], bool]]] = {"dedup": Dedup}
RULE_NAMES = (*NORMALISERS, *FILTERS, *STATEFUL_FILTERS)

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


def _bind(name: str, fn: Callable[..., Any], params: dict[str, Any], where: str) -> Callable[[str], Any]:
    """``fn`` with its parameters bound, after checking their names against its signature."""
    accepted = [p for p in inspect.signature(fn).parameters][1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(
            f"{where}: rule {name!r} has no parameter {unknown[0]!r} (accepted: {', '.join(accepted) or 'none'})"
        )
    if not params:
        return fn
    return lambda text: fn(text, **params)


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
                factory = STATEFUL_FILTERS[name]
                _bind(name, lambda text: None, params, where)  # no parameters
                self.rules.append(_Rule(name, factory(), is_filter=True))
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
