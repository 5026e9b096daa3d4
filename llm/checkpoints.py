"""Sharded (FSDP) checkpoints to one file: `python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt`.

Under ``trainer=fsdp`` every rank writes its own shards into a checkpoint *directory*; resuming reads it back with
the same world size. Consolidation gathers the model weights into a single ``.ckpt`` file, in the layout of a
single-device checkpoint, which ``llm.convert to-hf``, ``llm.generate``, ``init_from=`` and ``ckpt_path=`` on a
different world size (weights, not optimizer) accept. The format is llm/training/checkpoint.py.
"""

from __future__ import annotations

import sys

from llm.errors import LLMError
from llm.training.checkpoint import consolidate


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "consolidate":
        print("usage: python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt", file=sys.stderr)
        return 2
    try:
        consolidate(args[1], args[2])
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
