"""Evaluation: `python train.py experiment=eval init_from=CKPT data=...` measures a checkpoint and writes eval.json.

The kind of evaluation follows from the checkpoint and the data group:

| checkpoint | data | metrics |
| --- | --- | --- |
| language model | ``corpus`` / ``text`` | loss, perplexity, next-token accuracy (val split) |
| language model | ``sft`` | the same on response tokens; BLEU, ROUGE-L and exact match of greedy generations |
| classifier | ``classify`` | loss, accuracy, macro F1 / precision / recall, per-class precision, recall, F1, confusion |

Example sets given as ``data.paths`` alone are evaluated whole; with ``data.val_paths``, those are. A text corpus
is evaluated on its val split (``data.val_fraction``). ``trainer.limit_val_batches`` bounds the batches read.

The run directory gets ``eval.json`` (every number), ``samples.jsonl`` for generations (prompt, reference,
generation) and the same numbers in TensorBoard under ``eval/``. Evaluation runs in one process, on the first
GPU when the trainer config allows one, else on the CPU.

Definitions: loss is the mean cross-entropy per predicted token (per example for a classifier), perplexity its
exponential. BLEU is corpus BLEU-4 on whitespace tokens (``torchmetrics.text.BLEUScore``, no smoothing: 0 when
no 4-gram matches, as for one-word answers); ROUGE-L is the mean F-measure of the longest common subsequence
on lower-cased alphanumeric tokens (``torchmetrics.text.ROUGEScore``, no stemming, so nltk is not needed).
Macro averages are over the classes present in the labels or the predictions (torchmetrics, as scikit-learn).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.text import BLEUScore, ROUGEScore

from datamodules.classify import ClassifyDataModule
from datamodules.sft import SFTDataModule
from llm.app.builders import build_all
from llm.app.experiments import setting
from llm.core.sampling import generate
from llm.training.module import IGNORE_INDEX, SequenceClassifier, log_confusion


def kind_of(module: L.LightningModule, datamodule: L.LightningDataModule) -> str:
    """``"classification"``, ``"sft"`` or ``"text"`` (train.py's tasks.build_module rejected the other pairs)."""
    if isinstance(module, SequenceClassifier):
        return "classification"
    return "sft" if isinstance(datamodule, SFTDataModule) else "text"


def placement(trainer: DictConfig | dict) -> tuple[torch.device, torch.dtype | None]:
    """The device (first GPU if the trainer may use one) and the autocast dtype its precision asks for."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        precision = str(trainer.get("precision", "32-true"))
        dtype = (
            torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
        )
        return torch.device("cuda", 0), dtype
    return torch.device("cpu"), None


def _limited(loader: Iterable, limit: float | int | None) -> Iterable:
    """The batches of ``loader`` up to Lightning's ``limit_val_batches`` (an int: batches; a float: a fraction)."""
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        yield from loader
        return
    n = int(limit) if isinstance(limit, int) else max(1, int(limit * len(loader)))
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


# ----------------------------------------------------------------------------------------------------- metrics


@torch.inference_mode()
def language_model_metrics(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device=None, autocast=None
) -> dict[str, float]:
    """Loss per predicted token, perplexity and next-token accuracy over batches of ``{"input_ids", "labels"}``.

    Tokens labelled -100 (padding, prompts) do not count.
    """
    device = device or torch.device("cpu")
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with _autocast(device, autocast):
            logits = model(input_ids)
        logits = logits.float().flatten(0, 1)
        labels = labels.flatten()
        total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        keep = labels != IGNORE_INDEX
        correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no labelled token to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / count, "tokens": count}


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """Every classification number from logits (N, K) and targets (N,): overall, macro, and per class."""
    n = len(labels)
    logits, target = logits.float(), target.long()
    preds = logits.argmax(-1)

    def per_class(values: torch.Tensor) -> dict[str, float]:
        return {label: float(v) for label, v in zip(labels, values)}

    support = torch.bincount(target, minlength=n)
    return {
        "loss": float(F.cross_entropy(logits, target)),
        "accuracy": float(multiclass_accuracy(preds, target, n, average="micro")),
        "f1_macro": float(multiclass_f1_score(preds, target, n, average="macro")),
        "precision_macro": float(multiclass_precision(preds, target, n, average="macro")),
        "recall_macro": float(multiclass_recall(preds, target, n, average="macro")),
        "precision": per_class(multiclass_precision(preds, target, n, average=None)),
        "recall": per_class(multiclass_recall(preds, target, n, average=None)),
        "f1": per_class(multiclass_f1_score(preds, target, n, average=None)),
        "support": {label: int(s) for label, s in zip(labels, support)},
        "labels": list(labels),
        "confusion_matrix": multiclass_confusion_matrix(preds, target, n).tolist(),  # rows: true, columns: predicted
    }


@torch.inference_mode()
def classify_all(
    module: SequenceClassifier, batches: Iterable[dict[str, torch.Tensor]], device=None, autocast=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K), targets (N,)) of every example."""
    device = device or torch.device("cpu")
    logits, targets = [], []
    for batch in batches:
        with _autocast(device, autocast):
            out = module(batch["input_ids"].to(device), batch["lengths"].to(device))
        logits.append(out.float().cpu())
        targets.append(batch["labels"])
    return torch.cat(logits), torch.cat(targets)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4, mean ROUGE-L F-measure and exact match (ignoring case and punctuation) of the generations."""
    if not predictions:
        return {"bleu": 0.0, "rouge_l": 0.0, "exact_match": 0.0}
    bleu = BLEUScore(n_gram=4)(list(predictions), [[r] for r in references])
    rouge = ROUGEScore(rouge_keys=("rougeL",), use_stemmer=False)(list(predictions), list(references))
    exact = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references)) / len(predictions)
    return {"bleu": float(bleu), "rouge_l": float(rouge["rougeL_fmeasure"]), "exact_match": exact}


def generate_answers(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    decode,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> list[str]:
    """Greedy completions of each prompt, decoded, in the prompts' order (prompts batched by length)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new = generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_id=list(eos_ids), pad_id=pad_id)
        for i, tokens in zip(chunk, new):
            out[i] = decode(tokens).strip()
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------------------- run


def run(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> float:
    """Evaluate ``module`` (init_from's weights) on the data; write eval.json (and samples.jsonl); return the loss."""
    kind = kind_of(module, datamodule)
    device, autocast = placement(cfg.trainer)
    module.configure_model()
    module.to(device).eval()
    limit = cfg.trainer.get("limit_val_batches")
    batches = _limited(datamodule.val_dataloader(), limit)
    result: dict[str, Any] = {"kind": kind, "init_from": str(cfg.init_from), "data": _describe(datamodule)}
    samples: list[dict[str, str]] = []
    if kind == "classification":
        logits, target = classify_all(module, batches, device, autocast)
        metrics = classification_metrics(logits, target, module.labels)
        result["examples"] = len(target)
    else:
        metrics = language_model_metrics(module.model, batches, device, autocast)
        if kind == "sft":
            samples = _sft_samples(cfg, module, datamodule, device)
            metrics.update(generation_metrics([s["generation"] for s in samples], [s["reference"] for s in samples]))
            metrics["generated"] = len(samples)
            result["generation"] = {"decoding": "greedy", "max_new_tokens": int(setting(cfg, "max_new_tokens", 64))}
            metrics["response_tokens"] = metrics.pop("tokens")
    result["metrics"] = metrics

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if samples:
        with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    _log(cfg, metrics, samples)
    print(summary(result))
    return float(metrics["loss"])


def _sft_samples(cfg: DictConfig, module, datamodule: SFTDataModule, device: torch.device) -> list[dict[str, str]]:
    examples = datamodule.val_dataset.examples
    cap = setting(cfg, "max_samples", None)
    examples = examples if cap is None else examples[: int(cap)]
    special = module.checkpoint_extras.get("special_tokens") or {}
    eos_ids = special.get("eos_ids") or [datamodule.eos_id]
    tokenizer = datamodule.tokenizer
    generations = generate_answers(
        module.model,
        [e.prompt.tolist() for e in examples],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=int(setting(cfg, "max_new_tokens", 64)),
        batch_size=datamodule.batch_size,
        eos_ids=eos_ids,
        pad_id=datamodule.pad_id,
    )
    return [{"prompt": e.prompt_text, "reference": e.reference, "generation": g} for e, g in zip(examples, generations)]


def _describe(datamodule: L.LightningDataModule) -> dict[str, Any]:
    report = getattr(datamodule, "report", {}) or {}
    if isinstance(datamodule, (SFTDataModule, ClassifyDataModule)):
        return {
            "kind": datamodule.kind,
            "files": report.get("val_files") or report.get("files"),
            "split": report.get("val_split"),
            "examples": report.get("val", {}).get("examples"),
        }
    return {"kind": "text", "split": "val", "tokens": report.get("tokens", {}).get("val")}


def _log(cfg: DictConfig, metrics: dict[str, Any], samples: list[dict[str, str]]) -> None:
    """The same numbers in TensorBoard: scalars under eval/, per-class under eval/<metric>/<label>."""
    loggers = [lg for lg in build_all(cfg.logger) if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    scalars: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            scalars[f"eval/{key}"] = float(value)
        elif key in ("precision", "recall", "f1"):
            scalars.update({f"eval/{key}/{_tag(label)}": float(v) for label, v in value.items()})
    for logger in loggers:
        logger.log_metrics(scalars, step=0)
        if "confusion_matrix" in metrics:
            log_confusion(logger, "eval/confusion", torch.tensor(metrics["confusion_matrix"]), metrics["labels"], 0)
        for i, s in enumerate(samples[:16]):
            text = f"**prompt**  \n{s['prompt']}  \n**reference**  \n{s['reference']}  \n**generation**  \n{s['generation']}"
            logger.experiment.add_text(f"eval/samples/{i}", text.replace("\n", "  \n"), 0)
        logger.finalize("success")


def _tag(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def summary(result: dict[str, Any]) -> str:
    m = result["metrics"]
    keys = {
        "text": ("loss", "perplexity", "accuracy"),
        "sft": ("loss", "perplexity", "accuracy", "bleu", "rouge_l", "exact_match"),
        "classification": ("loss", "accuracy", "f1_macro"),
    }[result["kind"]]
    return f"eval ({result['kind']}): " + ", ".join(f"{k} {m[k]:.4g}" for k in keys) + " (eval.json)"
