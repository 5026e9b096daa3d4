"""The token shard format: the dtype, the writer and its index, the reader over several shards."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from datamodules.shards import ShardWriter, TokenShards, shards_intact, token_dtype


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_token_shards_pickle_without_their_maps(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    np.arange(5, dtype=np.uint16).tofile(a)
    np.arange(5, 8, dtype=np.uint16).tofile(b)
    shards = TokenShards([(a, 5), (b, 3), (tmp_path / "empty.bin", 0)], "uint16")
    assert shards[3:7].tolist() == [3, 4, 5, 6] and len(shards) == 8 and shards[:0].tolist() == []
    clone = pickle.loads(pickle.dumps(shards))
    assert clone._maps == [None, None, None] and np.asarray(clone).tolist() == list(range(8))
    with pytest.raises(IndexError):
        shards[8]


def test_writer_cuts_shards_and_the_reader_joins_them(tmp_path):
    writer = ShardWriter(tmp_path, "train", shard_tokens=4)
    for part in (np.arange(3), np.arange(3, 10), np.arange(0)):
        writer.write(part.astype(np.uint16))
    index = writer.close()
    assert index == [
        {"file": "train-00000.bin", "tokens": 4},
        {"file": "train-00001.bin", "tokens": 4},
        {"file": "train-00002.bin", "tokens": 2},
    ]
    assert writer.total == 10 and shards_intact(tmp_path, index, "uint16", 10)
    tokens = TokenShards([(tmp_path / s["file"], s["tokens"]) for s in index], "uint16")
    assert np.asarray(tokens).tolist() == list(range(10)) and tokens[2:9].tolist() == list(range(2, 9))
    assert not shards_intact(tmp_path, index, "uint16", 11)  # the index says another count
    assert not shards_intact(tmp_path, index, "uint32", 10)  # the files are not of that dtype's size
    (tmp_path / "train-00001.bin").write_bytes(b"\0\0")  # truncated
    assert not shards_intact(tmp_path, index, "uint16", 10)


def test_empty_split_still_has_one_shard(tmp_path):
    writer = ShardWriter(tmp_path, "val")
    assert writer.shard_tokens == 1 << 28  # SHARD_TOKENS by default
    index = writer.close()
    assert index == [{"file": "val-00000.bin", "tokens": 0}] and (tmp_path / "val-00000.bin").stat().st_size == 0
    assert len(TokenShards([(tmp_path / "val-00000.bin", 0)], "uint16")) == 0
