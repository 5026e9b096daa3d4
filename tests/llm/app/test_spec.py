"""Values the run derives from the config before building anything (llm/app/spec.py): gradient accumulation."""

from __future__ import annotations

import pytest

from llm.app.spec import resolve
from llm.errors import UserError
from tests.conftest import compose_config


def accumulation(*overrides: str) -> int:
    return resolve(compose_config(["trainer.accelerator=cpu", *overrides])).accumulation


def test_global_batch_sets_accumulation_over_data_parallel_replicas():
    assert accumulation("data.batch_size=4", "+data.global_batch_size=32") == 8
    assert accumulation("trainer=ddp", "trainer.devices=2", "data.batch_size=4", "+data.global_batch_size=32") == 4
    # tensor parallel over the 2 processes: one replica, both ranks read the same batch
    tp = ["trainer=fsdp", "trainer.devices=2", "trainer.strategy.tensor_parallel_size=2"]
    assert accumulation(*tp, "data.batch_size=4", "+data.global_batch_size=32") == 8


def test_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match="data.global_batch_size=30 is not a multiple of .* = 8"):
        accumulation("trainer=ddp", "trainer.devices=2", "data.batch_size=4", "+data.global_batch_size=30")
