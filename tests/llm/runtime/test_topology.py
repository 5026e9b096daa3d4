"""The processes of a run as the trainer config describes them, before any process exists."""

from __future__ import annotations

import pytest

from llm.errors import UserError
from llm.runtime.topology import Topology, accelerator_of

FSDP = {"_target_": "llm.training.parallelize.FSDP2Strategy"}


@pytest.mark.parametrize(
    ("trainer", "world", "replicas"),
    [
        ({"accelerator": "cpu", "devices": 1}, 1, 1),
        ({"accelerator": "cpu", "devices": 4, "num_nodes": 2}, 8, 8),
        ({"accelerator": "cpu", "devices": "0,1,3"}, 3, 3),  # Lightning's device-index string
        ({"accelerator": "cpu", "devices": [0, 1]}, 2, 2),
        ({"accelerator": "cpu", "devices": "auto"}, 1, 1),  # auto on the CPU: one process
        ({"accelerator": "cpu", "devices": 4, "strategy": {**FSDP, "tensor_parallel_size": 2}}, 4, 2),
    ],
)
def test_world_and_data_parallel_sizes(trainer, world, replicas):
    topology = Topology.from_trainer(trainer)
    assert (topology.world_size, topology.data_parallel_size) == (world, replicas)


def test_sharded_and_checkpointing_from_the_strategy():
    fsdp = Topology.from_trainer(
        {"accelerator": "cpu", "devices": 2, "strategy": {**FSDP, "activation_checkpointing": True}}
    )
    assert fsdp.sharded and fsdp.activation_checkpointing
    assert Topology.from_trainer({"accelerator": "cpu", "devices": 2, "strategy": "fsdp"}).sharded
    assert not Topology.from_trainer({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}).sharded


def test_accelerator_names():
    assert accelerator_of("cpu") == "cpu"
    assert accelerator_of("gpu") == accelerator_of("cuda") == "cuda"  # what was asked, present or not


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"devices": "two"}, "trainer.devices='two' is not a number of devices"),
        ({"devices": 0}, "trainer.devices=0 must be >= 1"),
        (
            {"devices": 3, "strategy": {**FSDP, "tensor_parallel_size": 2}},
            "tensor_parallel_size=2 does not divide the 3",
        ),
    ],
)
def test_bad_values_are_named(trainer, message):
    with pytest.raises(UserError, match=message):
        Topology.from_trainer({"accelerator": "cpu", **trainer})
