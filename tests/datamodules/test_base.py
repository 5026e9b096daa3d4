"""The DataModule contract: what the trainer reads from every DataModule, declared once in the base class."""

from __future__ import annotations

import typing

import pytest

from datamodules.base import PreparedDataModule
from datamodules.classify import ClassifyDataModule
from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule

CONTRACT = ("kind", "tokenizer", "vocab_size", "seq_len", "batch_size", "bos_id", "eos_id", "pad_id", "report")


def test_the_base_class_declares_the_contract():
    declared = typing.get_type_hints(PreparedDataModule)
    assert set(CONTRACT) <= set(declared)
    assert typing.get_origin(declared["kind"]) is typing.ClassVar
    assert "labels" in typing.get_type_hints(ClassifyDataModule) and "template" in typing.get_type_hints(SFTDataModule)


@pytest.mark.parametrize(
    ("cls", "kind"), [(PretrainDataModule, "text"), (SFTDataModule, "sft"), (ClassifyDataModule, "classify")]
)
def test_every_datamodule_fills_the_contract_before_prepare(cls, kind):
    dm = cls(seq_len=32, batch_size=2)
    assert cls.kind == dm.kind == kind
    for name in CONTRACT:
        assert hasattr(dm, name), name
    assert (dm.seq_len, dm.batch_size, dm.tokenizer, dm.vocab_size, dm.report) == (32, 2, None, None, {})
    assert (dm.bos_id, dm.eos_id, dm.pad_id) == (-1, -1, -1)
    assert dm.train_dataset is None and dm.val_dataset is None


def test_removed_leftovers_stay_removed():
    assert not hasattr(ClassifyDataModule, "num_classes")
    with pytest.raises(TypeError, match="global_batch_size"):
        PretrainDataModule(global_batch_size=32)
