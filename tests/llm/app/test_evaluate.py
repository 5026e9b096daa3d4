"""Evaluation metrics against values computed by hand, measured the way eval.json is: through the modules' own
validation (a one-device ``Trainer.validate`` over modules whose forward returns fixed logits)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from llm.app.evaluate import eval_trainer, generation_metrics, measure
from llm.errors import UserError
from llm.training.module import CausalLM, SequenceClassifier
from tests.conftest import debug_model

LABELS = ["a", "b", "c"]


def config(vocab_size: int) -> dict:
    return debug_model(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=vocab_size).to_dict()


class FixedLM(CausalLM):
    """A language model that returns the same logits table (B, T, V) for every batch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(config(logits.shape[-1]))
        self.table = logits

    def forward(self, input_ids: torch.Tensor, positions=None, segments=None) -> torch.Tensor:
        return self.table[: input_ids.shape[0], : input_ids.shape[1]].to(input_ids.device)


class FixedClassifier(SequenceClassifier):
    """A classifier whose logits for an example are row ``input_ids[:, 0]`` of a fixed table (N, K)."""

    def __init__(self, logits: torch.Tensor, labels: list[str] = LABELS) -> None:
        super().__init__(config(16), labels=labels)
        self.table = logits

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.table.to(input_ids.device)[input_ids[:, 0]]


class Batches(L.LightningDataModule):
    """Ready-made val batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def evaluate(module, batches, tmp_path, limit=None) -> dict:
    return measure(eval_trainer("cpu", "32-true", limit, tmp_path), module, Batches(batches))


def classifier_batches(target: torch.Tensor, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Example i carries its index in input_ids[i, 0] (FixedClassifier's lookup), in batches of ``sizes``."""
    out, start = [], 0
    for n in sizes:
        index = torch.arange(start, start + n)
        out.append({"input_ids": index[:, None], "lengths": torch.ones(n, dtype=torch.long), "labels": target[index]})
        start += n
    return out


def test_language_model_metrics_by_hand(tmp_path):
    # one row, 3 positions, vocabulary of 3; the last position is padding (-100)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, -100]])
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": labels}
    module = FixedLM(logits)
    m = evaluate(module, [batch, batch], tmp_path)
    # position 0: -log(e^2 / (e^2 + 2)); position 1: -log(1 / (e + 2)); prediction right at 0, wrong at 1
    nll0 = -math.log(math.e**2 / (math.e**2 + 2))
    nll1 = -math.log(1 / (math.e + 2))
    assert m["loss"] == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp((nll0 + nll1) / 2), rel=1e-6)
    assert m["accuracy"] == 0.5 and m["tokens"] == 4
    assert m == module.validation_results  # what training's validation keeps and logs
    assert module.val_tokens.update_count == 0  # reset at the epoch's end: the next validation starts anew


def test_language_model_loss_is_per_token_whatever_the_batches(tmp_path):
    """A batch of 1 labelled token weighs 1/3 against one of 2; a batch of none (a cut response) weighs nothing."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    one = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[0, -100, -100]])}
    two = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[0, 2, -100]])}
    none = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.full((1, 3), -100)}
    m = evaluate(FixedLM(logits), [one, two, none], tmp_path)
    nll0 = -math.log(math.e**2 / (math.e**2 + 2))
    nll1 = -math.log(1 / (math.e + 2))
    assert m["loss"] == pytest.approx((2 * nll0 + nll1) / 3, rel=1e-6)
    assert m["tokens"] == 3 and m["accuracy"] == pytest.approx(2 / 3)


def test_classification_metrics_by_hand(tmp_path):
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 4.0
    module = FixedClassifier(logits)
    m = evaluate(module, classifier_batches(target, [4, 2]), tmp_path)
    # a: tp 2, fp 0, fn 1 -> P 1, R 2/3; b: tp 1, fp 1, fn 1 -> P 1/2, R 1/2; c: tp 1, fp 1, fn 0 -> P 1/2, R 1
    precision = {"a": 1.0, "b": 0.5, "c": 0.5}
    recall = {"a": 2 / 3, "b": 0.5, "c": 1.0}
    f1 = {k: 2 * precision[k] * recall[k] / (precision[k] + recall[k]) for k in LABELS}
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(precision) and m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(f1)
    assert m["f1_macro"] == pytest.approx(sum(f1.values()) / 3)
    assert m["precision_macro"] == pytest.approx(2 / 3) and m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["support"] == {"a": 3, "b": 2, "c": 1}
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    p_right = math.e**4 / (math.e**4 + 2)  # softmax of a one-hot logit of 4 among 3
    assert m["loss"] == pytest.approx(-(4 * math.log(p_right) + 2 * math.log((1 - p_right) / 2)) / 6, rel=1e-6)
    assert m["labels"] == LABELS and m["examples"] == 6
    assert m == module.validation_results


def test_macro_f1_ignores_classes_absent_everywhere(tmp_path):
    module = FixedClassifier(torch.eye(3)[[0, 1]] * 3)
    m = evaluate(module, classifier_batches(torch.tensor([0, 1]), [2]), tmp_path)
    assert m["f1_macro"] == 1.0 and m["accuracy"] == 1.0


def test_generation_metrics_by_hand():
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"bleu": pytest.approx(1.0), "rouge_l": pytest.approx(1.0), "exact_match": 1.0}
    # BLEU: n-gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty)
    m = generation_metrics(["a b c d e"], ["a b c d f"])
    assert m["bleu"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-5)
    # ROUGE-L: LCS "the cat sat" = 3 tokens; P = 3/3, R = 3/6, F = 2PR / (P + R) = 2/3; case and punctuation ignored
    m = generation_metrics(["The cat, sat."], ["the cat sat on the mat"])
    assert m["rouge_l"] == pytest.approx(2 / 3, rel=1e-5) and m["exact_match"] == 0.0
    assert generation_metrics(["Emma"], ["emma."])["exact_match"] == 1.0
    assert generation_metrics([], []) == {"bleu": 0.0, "rouge_l": 0.0, "exact_match": 0.0}


def test_limit_and_placement(tmp_path):
    """trainer.limit_val_batches as Lightning reads it (an int: batches; a float: a fraction), on one device."""
    target = torch.zeros(10, dtype=torch.long)
    batches = classifier_batches(target, [1] * 10)  # one example per batch: examples == batches read
    module = FixedClassifier(torch.eye(3)[target])
    assert evaluate(module, batches, tmp_path, 1.0)["examples"] == 10
    assert evaluate(module, batches, tmp_path, 3)["examples"] == 3
    assert evaluate(module, batches, tmp_path, 0.25)["examples"] == 2
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate(module, batches, tmp_path, 0)
    trainer = eval_trainer("cpu", "bf16-mixed", None, tmp_path)
    assert trainer.strategy.root_device.type == "cpu" and trainer.num_devices == 1
    assert trainer.precision == "bf16-mixed"  # the run's precision, as training's validation runs under
    assert trainer.logger is None and trainer.checkpoint_callback is None


def test_bits_per_byte_by_hand(tmp_path):
    """val/bpb: the loss of the tokens that stand for text over ln 2 x their UTF-8 bytes; a special token (id 0
    here, 0 bytes) counts in neither sum, padding (-100) in none at all."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, 1, -100]])
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": labels}
    module = FixedLM(logits)
    module.token_bytes = torch.tensor([0, 3, 2])  # id 0: a special token; id 1: 3 bytes; id 2: 2 bytes
    m = evaluate(module, [batch], tmp_path)
    nll_2 = -math.log(1 / (math.e + 2))  # position 1, label 2 (2 bytes)
    nll_1 = -math.log(1 / (math.e**3 + 2))  # position 2, label 1 (3 bytes)
    assert m["bpb"] == pytest.approx((nll_2 + nll_1) / (math.log(2) * 5), rel=1e-6)
    assert m["bytes"] == 5 and m["tokens"] == 3  # the loss still counts the special token's prediction
    assert "bpb" not in evaluate(FixedLM(logits), [batch], tmp_path)  # no bytes table (a bare module): no bpb
