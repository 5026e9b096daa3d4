"""What every DataModule here shares: an idempotent ``prepare()`` behind Lightning's hooks, and the artefacts
it leaves in the run directory (``tokenizer.json``, ``data_report.json``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from tokenizers import Tokenizer


class PreparedDataModule(L.LightningDataModule):
    """Subclasses implement ``prepare()`` (idempotent: train.py calls it before building the model, whose
    vocabulary follows the tokenizer, and Lightning's hooks call it again), fill ``self.report``, and say where
    their tokenizer is in ``tokenizer_source()``."""

    report: dict[str, Any]

    def prepare(self) -> None:
        raise NotImplementedError

    def tokenizer_source(self) -> Path | Tokenizer:
        """The ``tokenizer.json`` the data was tokenized with, or the tokenizer itself when it has no file."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def save_artifacts(self, run_dir: str | Path) -> None:
        """Write ``tokenizer.json`` and ``data_report.json`` into ``run_dir``."""
        self.prepare()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / "tokenizer.json"
        source = self.tokenizer_source()
        if not (isinstance(source, Path) and target.exists() and source.samefile(target)):
            tmp = target.with_name(f".tokenizer.{os.getpid()}.json")
            if isinstance(source, Path):
                shutil.copyfile(source, tmp)
            else:
                source.save(str(tmp))
            tmp.replace(target)  # atomic: other ranks may write the same file
        with open(run_dir / "data_report.json", "w", encoding="utf-8") as f:
            json.dump(self.report, f, indent=2, ensure_ascii=False)
            f.write("\n")
