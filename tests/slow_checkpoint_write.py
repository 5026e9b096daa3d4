"""`python tests/slow_checkpoint_write.py [train.py overrides]`: train.py with every checkpoint write slowed down.

Fault injection for the kill-during-write test, kept out of the production code: ``torch.save`` sleeps after writing
each checkpoint into its temporary file, before the atomic rename, so the test can kill the run in the middle.
"""

import runpy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_save = torch.save


def _slow_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    time.sleep(2)


torch.save = _slow_save
sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
