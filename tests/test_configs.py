"""Every option of every config group composes, resolves and instantiates; typos fail at compose time."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from llm.app.builders import build, build_all, build_optimizer
from llm.app.schema import DATA_RUN_KEYS
from llm.app.spec import resolve
from llm.errors import UserError
from tests import conftest
from tests.conftest import CONF, CORPORA, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
# options that need a user value to compose (a mandatory `???` key)
NEEDS = {
    ("data", "text"): [f"data.paths=[{CORPORA / 'janeausten.jsonl'}]"],
    ("data", "mixture"): [f"+data.sources.austen.paths=[{CORPORA / 'janeausten.jsonl'}]"],
}
if not torch.cuda.is_available():  # the GPU options still compose; they are built for the CPU here
    NEEDS[("trainer", "gpu")] = ["trainer.accelerator=cpu", "trainer.precision=32-true"]


def test_every_group_has_options():
    assert {"experiment", "model", "data", "trainer", "optim", "sched", "callbacks", "logger"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    if group == "hparams_search":
        pytest.skip("sweeper configs are exercised by the sweep tests")
    if group == "logger" and option in ("wandb", "mlflow"):
        pytest.importorskip(option, reason=f'logger={option} needs pip install -e ".[tracking]"')
    cfg = compose_config([f"{group}={option}", *NEEDS.get((group, option), [])], run_dir=tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if group == "experiment" and option in ("finetune", "eval", "dpo"):
        with pytest.raises(UserError, match=f"experiment={option} needs init_from=CKPT"):
            resolve(cfg)
        cfg = compose_config([], run_dir=tmp_path)  # the groups are checked below with the default experiment
    if group == "adapter":  # adapters train on init_from's weights (QLoRA: on CUDA)
        assert build(cfg.adapter, "adapter").rank >= 1
        need = "needs a CUDA GPU" if option == "qlora" and not torch.cuda.is_available() else "give them as init_from"
        with pytest.raises(UserError, match=need):
            resolve(cfg)
        cfg = compose_config([], run_dir=tmp_path)
    spec = resolve(cfg)
    model_cfg = spec.model.with_vocab(1000)
    assert model_cfg.vocab_size % 64 == 0
    datamodule = build(cfg.data, "data", drop=tuple(k for k, _, _ in DATA_RUN_KEYS))  # built, not prepared
    assert datamodule.seq_len > 0
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = build_optimizer(cfg.optim)(params)
    instantiate(cfg.sched)(optimizer, max_steps=10)
    trainer = build(
        cfg.trainer,
        "trainer",
        **spec.trainer_arguments(),
        callbacks=build_all(cfg.callbacks),
        logger=build_all(cfg.logger),
    )
    assert str(tmp_path) in trainer.default_root_dir


@pytest.mark.parametrize(
    "override",
    [
        "model.dmi=64",
        "trainer.max_stepz=3",
        "optim.learning_rate=1",
        "sched.warmup=3",
        "seeed=3",
        "model.dim=abc",
        "experiment.max_new_tokns=3",
        "experiment.label_smoothing=lots",
    ],
)
def test_misspelt_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


@pytest.mark.parametrize(("path", "typo"), [("model/tiny.yaml", "n_layer: 3"), ("trainer/default.yaml", "max_step: 3")])
def test_misspelt_key_in_yaml_fails_at_compose(tmp_path, monkeypatch, path, typo):
    """A typo in a config file (not only on the command line) is caught by the group's schema."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with open(conf / path, "a") as f:
        f.write(f"\n{typo}\n")
    monkeypatch.setattr(conftest, "CONF", conf)
    with pytest.raises(ConfigCompositionException, match=typo.split(":")[0]):
        compose_config([])


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_config(["model=tinyy"])
