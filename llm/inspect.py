"""Looking inside a trained model: the nearest tokens of a word in the input embedding space.

    python -m llm.inspect neighbours ckpt_path=CKPT word=Darcy [k=10] [device=cpu]

prints the ``k`` tokens whose input embeddings (``tok_embeddings.weight``) have the highest cosine similarity with
the word's, one per line: the similarity, then the token. Any checkpoint ``llm.generate`` reads works: a training
checkpoint, one converted by ``python -m llm.convert from-hf``, a LoRA adapter checkpoint (read with its base; the
adapters never touch the embeddings).

Which tokens stand for the word: in running text a word follows a space, and byte-level BPE gives " Darcy" and
"Darcy" different tokens; the word is encoded both ways and the one with fewer tokens is used (on a tie, the
form with the space, the one most occurrences have). A word of several tokens is looked up by the mean of their
embeddings (the header line says so); its own tokens are left out of the list.

Tokens are shown as :func:`datamodules.tokenizer.token_labels` writes them, as the TensorBoard callbacks show them
(callbacks/embeddings.py, callbacks/attention.py): ``Ġthe`` as ``▁the``, a newline as ``\\n``, ``<|bos|>`` by its
name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from datamodules.tokenizer import token_labels
from llm.cli import parse_key_values
from llm.errors import LLMError, UserError

# ----------------------------------------------------------------------------------------------- neighbours


def word_ids(tokenizer: Any, word: str) -> list[int]:
    """The token ids that stand for ``word`` (see the module docstring: with or without a leading space)."""
    forms = [word] if word[:1].isspace() else [" " + word, word]
    encoded = [tokenizer.encode(f, add_special_tokens=False).ids for f in forms]
    return min(encoded, key=len)  # min keeps the first of equals: the spaced form


def neighbours(embeddings: torch.Tensor, ids: Sequence[int], k: int) -> list[tuple[int, float]]:
    """The ``k`` ids (not in ``ids``) of highest cosine similarity to the mean embedding of ``ids``.

    embeddings (V, C); returns [(id, similarity)] from the most similar down."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)  # (V, C)
    query = torch.nn.functional.normalize(embeddings[list(ids)].float().mean(0), dim=-1)  # (C,)
    sims = e @ query  # (V,)
    sims[list(ids)] = -float("inf")
    k = min(k, len(sims) - len(set(ids)))
    top = sims.topk(k)
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]


DEFAULTS: dict[str, Any] = {"ckpt_path": None, "word": None, "k": 10, "device": "cpu", "allow_unsafe_checkpoint": False}
COMMANDS = ("neighbours",)


def _parse(argv: list[str]) -> Any:
    if not argv or argv[0] not in COMMANDS:
        got = f", got {argv[0]!r}" if argv else ""
        raise UserError(f"usage: python -m llm.inspect neighbours ckpt_path=CKPT word=WORD [k=10]{got}")
    args = parse_key_values(argv[1:], DEFAULTS)
    if args.word is None or str(args.word) == "":
        raise UserError("word=WORD is required (a word or any text)")
    try:
        k = int(args.k)
    except (TypeError, ValueError) as err:
        raise UserError(f"k={args.k!r} is not an integer") from err
    if k < 1:
        raise UserError(f"k={k} must be >= 1")
    return {
        "ckpt_path": str(args.ckpt_path), "word": str(args.word), "k": k, "device": str(args.device),
        "allow_unsafe_checkpoint": args.allow_unsafe_checkpoint,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        from llm.generate import load_for_inference  # after the arguments: a mistake is told at once
        from llm.training import safe_load

        safe_load.allow_unsafe(args["allow_unsafe_checkpoint"])
        model, tokenizer, _ = load_for_inference(args["ckpt_path"], args["device"])
        if tokenizer is None:
            raise UserError(f"{args['ckpt_path']}: no tokenizer in the checkpoint nor in its run directory")
        ids = word_ids(tokenizer, args["word"])
        if not ids:
            raise UserError(f"word={args['word']!r} encodes to no token")
        embeddings = model.tok_embeddings.weight.detach()
        if max(ids) >= embeddings.shape[0]:
            raise UserError(f"word={args['word']!r}: token {max(ids)} is beyond the model's {embeddings.shape[0]}")
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pieces = " ".join(token_labels(tokenizer, ids))
    how = "its embedding" if len(ids) == 1 else f"the mean of its {len(ids)} token embeddings"
    print(f"# {args['word']!r} = {pieces}: nearest tokens to {how}, by cosine similarity")
    found = neighbours(embeddings, ids, args["k"])
    for (_, sim), label in zip(found, token_labels(tokenizer, [i for i, _ in found])):
        print(f"{sim:.4f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
