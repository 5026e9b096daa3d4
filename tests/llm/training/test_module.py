"""The LightningModules: pooling of the classifier, what a checkpoint carries, optimizer groups, validation metrics."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from llm.training.module import CausalLM, SequenceClassifier
from llm.training.optim import param_groups
from tests.conftest import debug_model

CFG = debug_model(dim=32, ffn_dim=64, vocab_size=64, max_seq_len=32)
LABELS = ["neg", "pos", "zzz"]


def classifier(**kw) -> SequenceClassifier:
    torch.manual_seed(0)
    module = SequenceClassifier(CFG.to_dict(), labels=LABELS, **kw)
    module.configure_model()
    return module.eval()


def test_classifier_reads_the_last_real_token():
    """Right padding changes nothing: each row's logits equal those of the row alone, unpadded."""
    module = classifier()
    rows = [torch.randint(3, 64, (n,)) for n in (5, 9, 2)]
    padded = torch.full((3, 9), 2, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        batched = module(padded, lengths)
        alone = torch.cat([module(r[None], torch.tensor([len(r)])) for r in rows])
        pooled = module.model.hidden(rows[0][None])[0, -1]
        by_hand = module.head(pooled)
    assert batched.shape == (3, len(LABELS))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], by_hand, rtol=1e-5, atol=1e-5)


def test_classifier_checkpoint_carries_labels_and_tokenizer():
    module = classifier(label_smoothing=0.1)
    module.tokenizer_json = '{"tok": 1}'
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert module.hparams["labels"] == LABELS and module.hparams["label_smoothing"] == 0.1
    assert ckpt["tokenizer"] == '{"tok": 1}' and "chat_template" not in ckpt
    assert {"head.weight", "head.bias", "model.tok_embeddings.weight"} <= set(ckpt["state_dict"])
    restored = SequenceClassifier(**module.hparams)
    restored.configure_model()
    restored.load_state_dict(ckpt["state_dict"])
    restored.on_load_checkpoint(ckpt)
    assert restored.labels == LABELS and restored.tokenizer_json == '{"tok": 1}'


def test_causal_lm_checkpoint_carries_chat_template_and_extras():
    module = CausalLM(CFG.to_dict())
    module.chat_format, module.chat_template = "<|{role}|>\n{content}\n", "{{ bos_token }}..."
    module.checkpoint_extras = {"special_tokens": {"eos": 1, "eos_ids": [1, 5]}}
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["chat_template"] == "{{ bos_token }}..." and ckpt["chat_format"] == "<|{role}|>\n{content}\n"
    assert ckpt["special_tokens"]["eos_ids"] == [1, 5]
    other = CausalLM(CFG.to_dict())
    other.on_load_checkpoint(ckpt)
    assert other.chat_format == module.chat_format and other.checkpoint_extras == module.checkpoint_extras


def test_load_weights_copies_a_transformer():
    source = CausalLM(CFG.to_dict())
    source.configure_model()
    module = classifier()
    module.load_weights(source.model.state_dict())
    for name, t in source.model.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], t), name


def test_untied_lm_head_is_frozen_and_left_out_of_the_optimizer():
    cfg = debug_model(**{**CFG.to_dict(), "tie_embeddings": False})
    module = SequenceClassifier(cfg.to_dict(), labels=LABELS)
    module.configure_model()
    params = [p for g in param_groups(module, 0.1) for p in g["params"]]
    ids = {id(p) for p in params}
    assert id(module.model.output.weight) not in ids
    assert id(module.head.weight) in ids and id(module.head.bias) in ids
    decayed = {id(p) for p in param_groups(module, 0.1)[0]["params"]}
    assert id(module.head.weight) in decayed and id(module.head.bias) not in decayed


class GradNorms(L.Callback):
    """Test helper: the total gradient norm the optimizer stepped with (clipping is done by then)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("fused", [None, False])
def test_gradients_are_clipped_with_the_default_fused_adamw(tmp_path, precision, fused):
    torch.manual_seed(0)
    module = CausalLM(CFG.to_dict(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused))
    batches = [{"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}] * 3
    norms = GradNorms()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        precision=precision,
        gradient_clip_val=1e-3,
        callbacks=[norms],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.optimizers[0].param_groups[0]["fused"] is (fused is None)  # null: the fused kernel
    assert len(norms.norms) == 3 and all(n <= 1e-3 * 1.01 for n in norms.norms), norms.norms


def validate(module: L.LightningModule, batches: list[dict], tmp_path) -> dict[str, float]:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return trainer.validate(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)[0]


def test_causal_lm_logs_what_its_validation_results_hold(tmp_path):
    """val/loss, val/ppl, val/acc (what TensorBoard gets) are the validation_results that eval.json reads."""
    torch.manual_seed(0)
    module = CausalLM(CFG.to_dict())
    labels = torch.randint(0, 64, (2, 16))
    labels[1, 10:] = -100
    batches = [{"input_ids": torch.randint(0, 64, (2, 16)), "labels": labels}] * 2
    logged = validate(module, batches, tmp_path)
    results = module.validation_results
    assert set(logged) == {"val/loss", "val/ppl", "val/acc"} and results["tokens"] == 2 * (16 + 10)
    assert logged["val/loss"] == pytest.approx(results["loss"], rel=1e-6)
    assert logged["val/ppl"] == pytest.approx(results["perplexity"], rel=1e-5)
    assert logged["val/acc"] == pytest.approx(results["accuracy"])
    with torch.no_grad():
        by_hand = module.loss(module(batches[0]["input_ids"]), labels)
    assert results["loss"] == pytest.approx(float(by_hand), rel=1e-5)


def test_classifier_logs_what_its_validation_results_hold(tmp_path):
    module = classifier()
    batches = [
        {"input_ids": torch.randint(3, 64, (4, 8)), "lengths": torch.tensor([8, 5, 3, 1]), "labels": torch.tensor(y)}
        for y in ([0, 1, 2, 1], [2, 2, 0, 1])
    ]
    logged = validate(module, batches, tmp_path)
    results = module.validation_results
    assert set(logged) == {"val/loss", "val/acc", "val/f1"}
    assert logged["val/loss"] == pytest.approx(results["loss"], rel=1e-6)
    assert logged["val/acc"] == pytest.approx(results["accuracy"])
    assert logged["val/f1"] == pytest.approx(results["f1_macro"])
    assert results["examples"] == 8 and results["support"] == {"neg": 2, "pos": 3, "zzz": 3}
    assert sum(map(sum, results["confusion_matrix"])) == 8 and results["labels"] == LABELS
