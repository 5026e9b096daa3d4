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


def test_planner_and_train_derive_the_same_accumulation(capsys):
    """`python -m llm.plan data.global_batch_size=64` plans the accumulation train.py uses (it used to print 1)."""
    from llm import plan

    overrides = ["trainer.accelerator=cpu", "data.batch_size=16", "data.global_batch_size=64"]
    assert resolve(compose_config(overrides)).accumulation == 4
    assert plan.main(overrides) == 0
    assert "gradient accumulation 4" in capsys.readouterr().out


def test_resolved_config_is_read_only():
    from omegaconf.errors import ReadonlyConfigError

    cfg = compose_config(["trainer.accelerator=cpu"])
    spec = resolve(cfg)
    with pytest.raises(ReadonlyConfigError):
        cfg.model.dim = 8
    assert spec.precision != "auto" and spec.model.dim == cfg.model.dim


def test_experiment_settings_are_typed_and_checked():
    spec = resolve(compose_config(["trainer.accelerator=cpu", "experiment=classify"]))
    assert spec.settings.label_smoothing == 0.1 and spec.experiment.name == "classify"
    with pytest.raises(UserError, match=r"experiment.label_smoothing=1.5 must be in \[0, 1\)"):
        resolve(compose_config(["trainer.accelerator=cpu", "experiment=classify", "experiment.label_smoothing=1.5"]))


def test_unknown_precision_is_named():
    with pytest.raises(UserError, match="trainer.precision='8-true' is not one of auto"):
        resolve(compose_config(["trainer.accelerator=cpu", "trainer.precision=8-true"]))


def test_a_held_out_set_is_validated_whole_unless_asked_otherwise(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("A held-out text.\n")
    base = ["trainer.accelerator=cpu", "data=text", f"data.paths=[{held_out}]"]
    assert resolve(compose_config(base)).limit_val_batches == 20  # the trainer's default: a sample of the split
    with_val = [*base, f"data.val_paths=[{held_out}]"]
    assert resolve(compose_config(with_val)).trainer_arguments()["limit_val_batches"] == 1.0
    asked = [*with_val, "trainer.limit_val_batches=3"]
    assert resolve(compose_config(asked), overrides=asked).limit_val_batches == 3
