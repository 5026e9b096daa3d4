"""Evaluation: `python train.py experiment=eval init_from=CKPT data=...` measures a checkpoint and writes eval.json.

The kind of evaluation follows from the checkpoint and the data group:

| checkpoint | data | metrics |
| --- | --- | --- |
| language model | ``corpus`` / ``text`` | loss, bits per byte, perplexity, next-token accuracy |
| language model | ``sft`` | the same on response tokens; BLEU, ROUGE-L and exact match of greedy generations |
| language model | ``preference`` | DPO's loss, rewards (chosen, rejected, accuracies, margins), log-probabilities |
| classifier | ``classify`` | loss, accuracy, macro F1 / precision / recall, per-class precision, recall, F1, confusion |

Data given as ``data.paths`` alone (example sets and text alike) is evaluated whole; with ``data.val_paths``, those
files are. ``trainer.limit_val_batches`` bounds the batches read.

The run directory gets ``eval.json`` (every number), ``samples.jsonl`` for generations (prompt, reference,
generation) and the same numbers in TensorBoard under ``eval/``.

The numbers other than the generations' are not computed here: a one-device Lightning ``Trainer.validate`` runs
the module's own ``validation_step`` and torchmetrics (llm/training/module.py), and eval.json gets the module's
``validation_results``: by definition the numbers training's validation logs as val/*. A Trainer rather than the
steps called by hand, because it places the module as training does (the run's accelerator, its first device,
``trainer.precision``'s autocast or dtype, no gradients, eval mode), reads ``trainer.limit_val_batches`` by
Lightning's own rule and calls the epoch-end hook that computes the metrics. Evaluation runs in one process.

Definitions (the module's docstrings have them too): loss is the mean cross-entropy per predicted token (per
example for a classifier), perplexity its exponential. BLEU is corpus BLEU-4 on whitespace tokens
(``torchmetrics.text.BLEUScore``, no smoothing: 0 when no 4-gram matches, as for one-word answers); ROUGE-L is the
mean F-measure of the longest common subsequence on lower-cased alphanumeric tokens (``torchmetrics.text.ROUGEScore``,
no stemming, so nltk is not needed). Macro averages are over the classes present in the labels or the predictions
(torchmetrics, as scikit-learn).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torchmetrics.text import BLEUScore, ROUGEScore

from llm.app.builders import build_all
from llm.app.schema import ExperimentSettings
from llm.core.sampling import generate
from llm.errors import UserError
from llm.training.module import SequenceClassifier, TransformerModule
from llm.training.plots import log_confusion

if TYPE_CHECKING:
    from llm.app.spec import RunSpec


def kind_of(module: L.LightningModule, datamodule: L.LightningDataModule) -> str:
    """``"classification"``, ``"sft"``, ``"preference"`` or ``"text"`` (the Eval experiment rejected the other pairs)."""
    if isinstance(module, SequenceClassifier):
        return "classification"
    if datamodule.kind == "preference":  # rewards against the reference (llm/training/dpo.py; Eval attached it)
        return "preference"
    return "sft" if datamodule.kind == "sft" else "text"


# ----------------------------------------------------------------------------------------------------- metrics


def eval_trainer(
    accelerator: str, precision: str, limit_val_batches: int | float | None, root_dir: str | Path | None = None
) -> L.Trainer:
    """A Trainer that only validates, on one device of ``accelerator`` ("cuda" or "cpu"), writing nothing."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        limit_val_batches=limit_val_batches,
        logger=False,  # eval.json and the eval/ scalars are written below, once
        enable_checkpointing=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )


def measure(trainer: L.Trainer, module: TransformerModule, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The module's validation metrics over ``datamodule``'s val batches (as many as the trainer's limit allows)."""
    module.validation_results = None
    trainer.validate(module, datamodule=datamodule, verbose=False)
    results = module.validation_results
    if not results or not results.get("tokens", results.get("examples")):
        raise UserError(
            "nothing to evaluate: the val split gave no labelled token or example"
            f" (trainer.limit_val_batches={trainer.limit_val_batches})"
        )
    return dict(results)


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


# --------------------------------------------------------------------------------------------------------- run


def run(spec: RunSpec, module: TransformerModule, datamodule: L.LightningDataModule) -> float:
    """Evaluate ``module`` (init_from's weights) on the data; write eval.json (and samples.jsonl); return the loss."""
    kind = kind_of(module, datamodule)
    limit = spec.limit_val_batches
    trainer = eval_trainer(spec.topology.accelerator, spec.precision, limit, spec.run_dir)
    metrics = measure(trainer, module, datamodule)
    result: dict[str, Any] = {"kind": kind, "init_from": spec.init.path, "data": _describe(datamodule)}
    samples: list[dict[str, str]] = []
    if kind == "classification":
        result["examples"] = metrics.pop("examples")  # beside the metrics, as before: not an eval/ scalar
    elif kind == "sft":
        # the Trainer's teardown left the module on the CPU (and in the mode it found it): generate on the device
        module.to(trainer.strategy.root_device).eval()
        samples = _sft_samples(spec.settings, module, datamodule)
        metrics.update(generation_metrics([s["generation"] for s in samples], [s["reference"] for s in samples]))
        metrics["generated"] = len(samples)
        result["generation"] = {"decoding": "greedy", "max_new_tokens": spec.settings.max_new_tokens}
        metrics["response_tokens"] = metrics.pop("tokens")
    elif kind == "preference":  # the policy the rewards are measured against: a checkpoint, or the adapters' base
        result["reference"] = module.reference_path or "init_from's base weights (adapters disabled)"
    result["metrics"] = metrics

    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if samples:
        with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    _log(spec.cfg.logger, metrics, samples)
    print(summary(result))
    return float(metrics["loss"])


def _sft_samples(settings: ExperimentSettings, module, datamodule: L.LightningDataModule) -> list[dict[str, str]]:
    examples = datamodule.val_dataset.examples
    cap = settings.max_samples
    examples = examples if cap is None else examples[: int(cap)]
    special = module.checkpoint_extras.get("special_tokens") or {}
    eos_ids = special.get("eos_ids") or [datamodule.eos_id]
    tokenizer = datamodule.tokenizer
    generations = generate_answers(
        module.model,
        [e.prompt.tolist() for e in examples],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=settings.max_new_tokens,
        batch_size=datamodule.batch_size,
        eos_ids=eos_ids,
        pad_id=datamodule.pad_id,
    )
    return [{"prompt": e.prompt_text, "reference": e.reference, "generation": g} for e, g in zip(examples, generations)]


def _describe(datamodule: L.LightningDataModule) -> dict[str, Any]:
    report = getattr(datamodule, "report", {}) or {}
    if datamodule.kind in ("sft", "classify", "preference"):
        return {
            "kind": datamodule.kind,
            "files": report.get("val_files") or report.get("files"),
            "split": report.get("val_split"),
            "examples": report.get("val", {}).get("examples"),
        }
    split = (report.get("split") or {}).get("val_split", "val")  # data.val_paths, or the val_fraction it took
    return {"kind": "text", "split": split, "tokens": report.get("tokens", {}).get("val")}


def _log(logger_cfg: DictConfig, metrics: dict[str, Any], samples: list[dict[str, str]]) -> None:
    """The same numbers in every logger: scalars under eval/, per-class under eval/<metric>/<label>; in TensorBoard
    also the confusion matrix and the samples."""
    loggers = build_all(logger_cfg)
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
        if not isinstance(logger, TensorBoardLogger):
            logger.finalize("success")
            continue
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
        "text": ("loss", "bpb", "perplexity", "accuracy"),
        "sft": ("loss", "bpb", "perplexity", "accuracy", "bleu", "rouge_l", "exact_match"),
        "classification": ("loss", "accuracy", "f1_macro"),
        "preference": ("loss", "rewards/accuracies", "rewards/margins"),
    }[result["kind"]]
    shown = [k for k in keys if m.get(k) is not None]
    return f"eval ({result['kind']}): " + ", ".join(f"{k} {m[k]:.4g}" for k in shown) + " (eval.json)"
