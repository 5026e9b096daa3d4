"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llm.app.evaluate import _limited, classification_metrics, generation_metrics, language_model_metrics, placement


class FixedLogits(torch.nn.Module):
    """A 'model' that returns the same logits table for every batch (B, T, V)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits[: input_ids.shape[0], : input_ids.shape[1]]


def test_language_model_metrics_by_hand():
    # one row, 3 positions, vocabulary of 3; the last position is padding (-100)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, -100]])
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": labels}
    m = language_model_metrics(FixedLogits(logits), [batch, batch])
    # position 0: -log(e^2 / (e^2 + 2)); position 1: -log(1 / (e + 2)); prediction right at 0, wrong at 1
    nll0 = -math.log(math.e**2 / (math.e**2 + 2))
    nll1 = -math.log(1 / (math.e + 2))
    assert m["loss"] == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp((nll0 + nll1) / 2), rel=1e-6)
    assert m["accuracy"] == 0.5 and m["tokens"] == 4


def test_classification_metrics_by_hand():
    labels = ["a", "b", "c"]
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 4.0
    m = classification_metrics(logits, target, labels)
    # a: tp 2, fp 0, fn 1 -> P 1, R 2/3; b: tp 1, fp 1, fn 1 -> P 1/2, R 1/2; c: tp 1, fp 1, fn 0 -> P 1/2, R 1
    precision = {"a": 1.0, "b": 0.5, "c": 0.5}
    recall = {"a": 2 / 3, "b": 0.5, "c": 1.0}
    f1 = {k: 2 * precision[k] * recall[k] / (precision[k] + recall[k]) for k in labels}
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(precision) and m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(f1)
    assert m["f1_macro"] == pytest.approx(sum(f1.values()) / 3)
    assert m["precision_macro"] == pytest.approx(2 / 3) and m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["support"] == {"a": 3, "b": 2, "c": 1}
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    p_right = math.e**4 / (math.e**4 + 2)  # softmax of a one-hot logit of 4 among 3
    assert m["loss"] == pytest.approx(-(4 * math.log(p_right) + 2 * math.log((1 - p_right) / 2)) / 6, rel=1e-6)


def test_macro_f1_ignores_classes_absent_everywhere():
    m = classification_metrics(torch.eye(3)[[0, 1]] * 3, torch.tensor([0, 1]), ["a", "b", "c"])
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


def test_limit_and_placement():
    assert list(_limited(range(10), 1.0)) == list(range(10))
    assert list(_limited(range(10), 3)) == [0, 1, 2]
    assert list(_limited(list(range(10)), 0.25)) == [0, 1]
    device, dtype = placement({"accelerator": "cpu", "precision": "bf16-mixed"})
    assert device.type == "cpu" and dtype is None
