"""Encoding: the number of processes that prepare files, and BOS document EOS per document."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import encoding, filecache
from datamodules.sources import DataError
from datamodules.tokenizer import train_tokenizer


def test_processes(monkeypatch):
    monkeypatch.setattr(filecache, "available_cpus", lambda: 8)
    assert filecache.processes(3, 10, 10) == 3  # the user's choice wins
    assert filecache.processes(3, 2, 10) == 2  # at most one per file
    assert filecache.processes(None, 10, filecache.POOL_MIN_BYTES - 1) == 1  # small corpus: in-process
    assert filecache.processes(None, 1, 1 << 40) == 1  # one file: one task
    assert filecache.processes(None, 100, 1 << 40) == 8
    monkeypatch.setattr(filecache, "available_cpus", lambda: 2)
    assert filecache.processes(None, 100, 1 << 40) == 2
    with pytest.raises(DataError, match=r"data\.num_proc=0 must be at least 1"):
        filecache.processes(0, 10, 10)


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
