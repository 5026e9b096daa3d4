"""Greedy text samples from fixed prompts, written to TensorBoard at every validation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llm.core.sampling import generate


class TextSamples(L.Callback):
    """After each validation, complete each prompt greedily and log prompt + completion as text.

    Greedy decoding makes samples comparable across validations: a change in the text is a change in the
    model, not in the dice. The tokenizer comes from the DataModule (``trainer.datamodule.tokenizer``).
    """

    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 48) -> None:
        self.prompts = list(prompts or ["It is a truth universally acknowledged", "She was"])
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        # every rank generates: under FSDP each forward gathers parameters from all ranks (same prompts, greedy:
        # every rank takes the same number of steps); only rank 0 writes
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)] if trainer.is_global_zero else []
        tokenizer = trainer.datamodule.tokenizer
        texts = []
        for prompt in self.prompts:
            ids = tokenizer.encode(prompt).ids  # the tokenizer adds BOS, as it did for the training documents
            out = generate(pl_module.model, [ids], self.max_new_tokens, eos_id=trainer.datamodule.eos_id)[0]
            texts.append(f"**{prompt}**{tokenizer.decode(out)}")
        for logger in loggers:
            for i, text in enumerate(texts):
                # TensorBoard renders text as markdown; two trailing spaces keep line breaks
                logger.experiment.add_text(f"samples/{i}", text.replace("\n", "  \n"), trainer.global_step)
