"""A run directory that cannot be written is refused before Hydra starts the job, in one line.

Hydra creates the run directory (and `.hydra/`, the job's log file) before it calls ``train.main``; in a
read-only place that fails inside Hydra's logging set-up with a traceback that names neither the directory nor
the key to change. This Hydra callback runs first (``on_run_start`` / ``on_multirun_start``, before Hydra
creates anything), tries to create the directory and write a file in it, and ends the process with exit code 2
and one line naming the directory and the key that chose it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class WritableRunDir(Callback):
    """Registered in conf/config.yaml under ``hydra.callbacks``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config, "hydra.sweep.dir")


def check_writable(config: DictConfig, key: str) -> None:
    """Exit 2 with one line when the directory ``key`` names cannot be created or written."""
    try:
        directory = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job context resolves: Hydra will say
        return
    if directory is None:
        return
    why = unwritable(Path(str(directory)))
    if why:
        print(f"error: the run directory {directory} cannot be written ({why}); choose another with {key}=...",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot hold the run's files (None: it can). Creates it, as Hydra would next."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or type(err).__name__
    return None
