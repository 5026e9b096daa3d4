"""Norms: gradient, parameter and update norms per block, only on every n-th step, and correct."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks.norms import Norms, block_of, group_norms
from llm.core.model import Transformer
from tests.conftest import debug_model

LR = 0.5


class Recorder(Logger):
    """Test logger: keeps every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.setdefault(step, {}).update(metrics)


class TinyLM(L.LightningModule):
    """A 2-block Transformer on random tokens, trained with plain SGD: an update is exactly -LR x gradient."""

    def __init__(self) -> None:
        super().__init__()
        cfg = debug_model(dim=32, ffn_dim=64, vocab_size=64, max_seq_len=16, tie_embeddings=True)
        self.model = Transformer(cfg)
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.weights[self.global_step] = {n: p.detach().clone() for n, p in self.named_parameters()}
        logits = self.model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def on_after_backward(self) -> None:
        self.grads[self.global_step] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        data = torch.randint(0, 64, (32, 9), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(tmp_path, norms: Norms, steps: int, **trainer_kwargs) -> tuple[TinyLM, Recorder]:
    torch.manual_seed(0)
    module, logger = TinyLM(), Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[norms],
        logger=logger,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return module, logger


def block_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    squares: dict[str, float] = {}
    for name, t in tensors.items():
        squares[block_of(name)] = squares.get(block_of(name), 0.0) + float(t.double().square().sum())
    return {block: s**0.5 for block, s in squares.items()}


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("model.layers.3.attention.wq.weight", "layers.3"),
        ("model.tok_embeddings.weight", "tok_embeddings"),
        ("model.norm.weight", "norm"),
        ("head.weight", "head"),
        ("model.layers.10._checkpoint_wrapped_module.feed_forward.w1.weight", "layers.10"),
        ("_orig_mod.model.layers.0.attention_norm.weight", "layers.0"),
    ],
)
def test_block_of(name, block):
    assert block_of(name) == block


def test_group_norms_per_block_and_total():
    norms = group_norms([("model.layers.0.a", torch.tensor([3.0])), ("model.layers.0.b", torch.tensor([4.0]))])
    assert norms == {"layers.0": pytest.approx(5.0), "total": pytest.approx(5.0)}
    assert group_norms([]) == {}


def test_norms_only_on_every_nth_step_and_correct(tmp_path):
    module, logger = fit(tmp_path, Norms(every_n_steps=2), steps=5)
    assert sorted(logger.logged) == [0, 2, 4]
    blocks = {"tok_embeddings", "layers.0", "layers.1", "norm"}  # the head is tied to the embedding
    for step, metrics in logger.logged.items():
        assert {t.rsplit("/", 1)[1] for t in metrics if t.startswith("norms/update/")} == blocks
        grads = block_norms(module.grads[step])
        weights = block_norms(module.weights[step])
        for block in blocks:
            assert metrics[f"norms/grad/{block}"] == pytest.approx(grads[block], rel=1e-5)
            assert metrics[f"norms/param/{block}"] == pytest.approx(weights[block], rel=1e-5)
            # SGD without momentum: the step moved each block by LR x its gradient
            assert metrics[f"norms/update/{block}"] == pytest.approx(LR * grads[block], rel=1e-4)
        assert metrics["norms/grad_total"] == pytest.approx(sum(v**2 for v in grads.values()) ** 0.5, rel=1e-5)
        assert metrics["norms/update_total"] == pytest.approx(LR * metrics["norms/grad_total"], rel=1e-4)


def test_norms_are_of_the_gradient_before_clipping(tmp_path):
    _, logger = fit(tmp_path, Norms(every_n_steps=1), steps=2, gradient_clip_val=1e-3)
    for metrics in logger.logged.values():
        assert metrics["norms/grad_total"] > 1e-2  # unclipped
        assert metrics["norms/update_total"] == pytest.approx(LR * 1e-3, rel=1e-3)  # clipped before the step


def test_norms_with_gradient_accumulation_follow_optimizer_steps(tmp_path):
    _, logger = fit(tmp_path, Norms(every_n_steps=1, per_block=False), steps=3, accumulate_grad_batches=2)
    assert sorted(logger.logged) == [0, 1, 2]
    for metrics in logger.logged.values():
        assert set(metrics) == {"norms/grad_total", "norms/param_total", "norms/update_total"}
        assert metrics["norms/update_total"] > 0


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        Norms(every_n_steps=0)
