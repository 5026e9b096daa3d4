"""Tokenizers: train a byte-level BPE on the cleaned corpus, or load a ``tokenizer.json``.

Byte-level means the base alphabet is the 256 bytes: every string, in any script, encodes without
unknown tokens and decodes back to exactly the same string (no normaliser, no added prefix space).
The special tokens come first, so a trained tokenizer always has ``<|bos|>`` = 0, ``<|eos|>`` = 1 and
``<|pad|>`` = 2. Like Llama's tokenizers, a trained one adds BOS in front of what it encodes (its post-processor,
which ``transformers.AutoTokenizer`` honours too); :mod:`datamodules.encoding` encodes without special tokens
and adds BOS and EOS itself.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from datamodules.sources import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# The default data.tokenizer_sample_bytes: above it, the tokenizer is trained on a seeded sample of this size.
# bench/tokenizer_sample.py: on real text, 1-2 MB reach 99% of the compression of all of it at 4k-16k tokens, and
# training takes about 10 s per 100 MB here; so 100 MB leaves room for larger vocabularies and more varied text
# while bounding the time and the trainer's memory (its word counts) whatever the corpus size.
TOKENIZER_SAMPLE_BYTES = 100_000_000

# Names other tokenizers use for the same roles, tried in order when loading one.
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer."""
    tok = Tokenizer(models.BPE())
    # use_regex: split words, numbers and punctuation as GPT-2 does before merging
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _batches(docs: Iterable[str], sample_bytes: int | None, batch_size: int = 256) -> Iterator[list[str]]:
    """Documents in lists (the trainer processes a list in parallel), stopping after ``sample_bytes``."""
    batch: list[str] = []
    seen = 0
    for doc in docs:
        if sample_bytes is not None:
            if seen >= sample_bytes:
                break
            seen += len(doc.encode("utf-8"))
        batch.append(doc)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(docs: Iterable[str], vocab_size: int, sample_bytes: int | None = None) -> Tokenizer:
    """Train byte-level BPE with ``vocab_size`` tokens (special tokens included) on ``docs``.

    ``sample_bytes`` stops reading after that many UTF-8 bytes (the caller decides which documents come
    first). On a small corpus the vocabulary may end up smaller than asked: merges run out.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"data.vocab_size={vocab_size} is too small for byte-level BPE (minimum {MIN_VOCAB_SIZE})")
    if sample_bytes is not None and sample_bytes <= 0:
        raise DataError(f"data.tokenizer_sample_bytes={sample_bytes} must be positive (or null for all)")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # its own progress bar, on a terminal only
    )
    tok.train_from_iterator(_batches(docs, sample_bytes), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``data.tokenizer`` names: the file itself, or the one inside a directory (a
    Hugging Face model directory, as ``python -m llm.convert to-hf`` or ``save_pretrained`` writes it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
        raise DataError(
            f"data.tokenizer={path}: the directory has no tokenizer.json (a Hugging Face model directory needs its "
            "fast tokenizer: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one)"
        )
    if not p.is_file():
        raise DataError(f"data.tokenizer={path}: no such file")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one in a directory); a missing or invalid file is a :class:`DataError`
    naming the path."""
    p = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a plain Exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data.tokenizer={path}: not a valid tokenizer.json ({reason})") from None
    special_ids(tok, name=str(path))  # fail now if it has no end-of-sequence token
    return tok


def _first_id(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def special_ids(tok: Tokenizer, name: str = "tokenizer") -> tuple[int, int, int]:
    """``(bos_id, eos_id, pad_id)``. A tokenizer without BOS or PAD uses EOS for them; without EOS: error."""
    eos = _first_id(tok, _EOS_NAMES)
    if eos is None:
        raise DataError(f"data.tokenizer={name}: no end-of-sequence token (looked for {', '.join(_EOS_NAMES)})")
    bos = _first_id(tok, _BOS_NAMES)
    pad = _first_id(tok, _PAD_NAMES)
    return (eos if bos is None else bos), eos, (eos if pad is None else pad)


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each of the 256 bytes is written as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tok: Tokenizer) -> bool:
    """Whether the tokenizer decodes through byte-level BPE's alphabet (ours, GPT-2's, Llama 3's)."""
    return '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get("decoder"))  # also inside a Sequence


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text that each token id stands for, (vocab_size,) int64; 0 for special tokens.

    The denominator of bits per byte, which compares models whatever their tokenizer. Exact for byte-level BPE
    (ours, GPT-2's, Llama 3's): a token is a run of bytes, one alphabet character each, so a text's tokens add up
    to its byte length. Other tokenizers (SentencePiece's ``▁`` and ``<0xNN>`` byte tokens, WordPiece's ``##``)
    are counted from each token's own text, which can differ from the text by the word-boundary spaces.
    """
    n = tok.get_vocab_size(with_added_tokens=True)
    table = np.zeros(n, dtype=np.int64)
    added = tok.get_added_tokens_decoder()
    alphabet = _byte_of_char()
    byte_level = _is_byte_level(tok)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= n:
            continue
        if i in added:
            table[i] = 0 if added[i].special else len(token.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in token):
            table[i] = len(token)  # one character per byte
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            table[i] = 1  # SentencePiece's byte fallback
        else:
            table[i] = len(token.replace("\u2581", " ").removeprefix("##").encode("utf-8"))
    return table


def _visible(text: str) -> str:
    """``text`` with blanks and control characters made visible (see token_labels)."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("▁")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte of an incomplete UTF-8 character (surrogateescape's form)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "''"


def token_labels(tok: Tokenizer, ids: Iterable[int]) -> list[str]:
    """A readable label for each token id, for people (TensorBoard's projector and attention maps, llm.inspect).

    A byte-level BPE token is shown as the text it stands for, with a space as ``▁`` (as SentencePiece writes
    it: ``Ġthe`` -> ``▁the``), newline, tab and carriage return as ``\\n``, ``\\t``, ``\\r``, other control
    characters and the bytes of an incomplete UTF-8 character as ``\\xNN``; a special token by its name
    (``<|bos|>``); a token of another kind of tokenizer (SentencePiece, WordPiece) as its vocabulary entry, which is
    readable already (``▁the``, ``<0x0A>``, ``##ing``), blanks made visible the same way; an id past the
    vocabulary as ``<id N>``. No label holds a tab or a newline, so each fits a line of a TSV file.
    """
    special = {i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = _is_byte_level(tok)
    alphabet = _byte_of_char()
    labels = []
    for i in map(int, ids):
        piece = tok.id_to_token(i)
        if i in special:
            labels.append(_visible(special[i]))
        elif piece is None:  # a model whose embedding has more rows than the vocabulary
            labels.append(f"<id {i}>")
        elif byte_level and all(c in alphabet for c in piece):
            labels.append(_visible(bytes(alphabet[c] for c in piece).decode("utf-8", errors="surrogateescape")))
        else:
            labels.append(_visible(piece))
    return labels
