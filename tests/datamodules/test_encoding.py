"""Encoding: the number of worker processes, and BOS document EOS per document."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import encoding
from datamodules.sources import DataError
from datamodules.tokenizer import train_tokenizer


def test_encode_processes(monkeypatch):
    monkeypatch.setattr(encoding, "available_cpus", lambda: 8)
    assert encoding.encode_processes(3, 10) == 3  # the user's choice wins
    assert encoding.encode_processes(None, encoding.POOL_MIN_BYTES - 1) == 1  # small corpus: in-process
    assert encoding.encode_processes(None, 1 << 40) == 8
    monkeypatch.setattr(encoding, "available_cpus", lambda: 2)
    assert encoding.encode_processes(None, 1 << 40) == 1  # 2 cores: encode_batch's threads measured no slower
    with pytest.raises(DataError, match=r"data\.num_proc=0 must be at least 1"):
        encoding.encode_processes(0, 10)


def test_encode_documents_bos_and_eos_per_document():
    docs = ["one fine day", "two", "three more words"]
    tok = train_tokenizer(docs * 10, vocab_size=300)
    ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    is_val = np.array([False, True, False])
    train, val = encoding.encode_documents(tok, docs, is_val, 0, 1, np.dtype(np.uint16))
    assert train.dtype == np.uint16 and train.tolist() == [0, *ids[0], 1, 0, *ids[2], 1]
    assert val.tolist() == [0, *ids[1], 1]
    train, val = encoding.encode_documents(tok, docs, is_val, 1, 1, np.dtype(np.uint32))  # BOS is EOS: EOS only
    assert train.tolist() == [*ids[0], 1, *ids[2], 1] and val.dtype == np.uint32
