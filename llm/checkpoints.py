"""Sharded (FSDP) checkpoints to one file: `python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt`.

Under ``trainer=fsdp`` every rank writes its own shards into a checkpoint *directory*; resuming reads it back with
the same world size. Consolidation gathers the model weights into a single ``.ckpt`` file, in the layout of a
single-device checkpoint, which ``llm.convert to-hf``, ``llm.generate``, ``init_from=`` and ``ckpt_path=`` on a
different world size (weights, not optimizer) accept. The format is llm/training/checkpoint.py.
"""

from __future__ import annotations

import sys

from llm.errors import LLMError
from llm.training import safe_load
from llm.training.checkpoint import consolidate

UNSAFE_FLAG = safe_load.CLI_FLAG


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    unsafe = UNSAFE_FLAG in args  # plain pickle, which runs any code the directory holds (trusted files only)
    args = [a for a in args if a != UNSAFE_FLAG]
    if len(args) != 3 or args[0] != "consolidate":
        print(f"usage: python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt [{UNSAFE_FLAG}]", file=sys.stderr)
        return 2
    try:
        safe_load.allow_unsafe(unsafe)
        consolidate(args[1], args[2])
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
