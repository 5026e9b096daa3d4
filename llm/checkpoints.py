"""Sharded (FSDP) checkpoints to one file: `python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt`.

Under ``trainer=fsdp`` every rank writes its own shards into a checkpoint *directory* (``last.ckpt/``: the
``.distcp`` shards, ``.metadata``, and ``meta.pt`` with the trainer state). Resuming reads it back with the
same world size. Consolidation gathers the model weights into a single ``.ckpt`` file, in the layout of a
single-device checkpoint (``state_dict`` + ``hyper_parameters`` + tokenizer), which ``llm.convert to-hf``,
``llm.generate``, ``init_from=`` and ``ckpt_path=`` on a different world size (weights, not optimizer) accept.
It runs in one process without a process group.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from llm.errors import UserError


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / "meta.pt").is_file() and (Path(path) / ".metadata").is_file()


def consolidate(ckpt_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """The sharded checkpoint at ``ckpt_dir`` as one in-memory checkpoint (written to ``out`` if given)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt_dir = Path(ckpt_dir)
    if not is_sharded(ckpt_dir):
        raise UserError(f"{ckpt_dir}: not a sharded checkpoint directory (no meta.pt and .metadata)")
    meta = torch.load(ckpt_dir / "meta.pt", map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(ckpt_dir, flat)
        full = torch.load(flat, map_location="cpu", weights_only=False)
    ckpt = {k: v for k, v in meta.items() if k not in ("loops", "optimizer_states", "lr_schedulers")}
    ckpt["state_dict"] = full["state_dict"]
    ckpt["consolidated_from"] = str(ckpt_dir)
    if out is not None:
        out = Path(out)
        tmp_out = out.with_name(out.name + ".tmp")
        torch.save(ckpt, tmp_out)
        tmp_out.replace(out)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "consolidate":
        print("usage: python -m llm.checkpoints consolidate CKPT_DIR OUT.ckpt", file=sys.stderr)
        return 2
    try:
        consolidate(args[1], args[2])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
