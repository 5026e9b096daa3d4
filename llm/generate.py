"""Text generation from a checkpoint:

    python -m llm.generate ckpt_path=CKPT prompt="..." [max_new_tokens=64 temperature=0 top_k=null top_p=null seed=0]

`prompt=[a,b,c]` generates for a batch of prompts (printed in order, separated by `---` lines). `temperature=0` is
greedy; otherwise the logits are divided by the temperature, cut to the `top_k` most likely tokens and to the
smallest set whose probability reaches `top_p`, and sampled with a generator seeded by `seed` (the same seed
gives the same text). Sampling itself (KV cache, left padding, a batch generated step by step) is
llm/core/sampling.py.

Besides the command, this module is what every user of a trained model shares (chat, serve, human evaluation):
``load_model`` (model, tokenizer, special tokens, chat format and name of a checkpoint), ``ChatFormat`` (a
conversation's prompt tokens, as the model was finetuned on them) and ``TextStream`` (a row's tokens as text as
they come, with stop strings).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.cli import parse_key_values
from llm.core.model import Transformer
from llm.core.sampling import check_sampling, generate
from llm.errors import LLMError, UserError
from llm.training import checkpoint, safe_load


@dataclass
class Loaded:
    """A checkpoint ready to generate: what ``load_model`` returns."""

    model: Transformer
    tokenizer: Any  # tokenizers.Tokenizer
    ids: dict[str, Any]  # {"bos", "eos", "pad", "eos_ids"} (checkpoint.special_ids)
    chat: ChatFormat | None  # None: a base model, which continues plain text
    name: str  # the model's name for an API: the checkpoint file's stem

    @property
    def start_token(self) -> int:
        """What an empty prompt starts from: BOS, else EOS (a document boundary), else 0."""
        return next((self.ids[r] for r in ("bos", "eos") if self.ids.get(r) is not None), 0)

    @property
    def pad_id(self) -> int:
        return self.ids["pad"] if self.ids.get("pad") is not None else 0

    def encode(self, text: str) -> list[int]:
        """A plain-text prompt's tokens (an empty prompt is the start token)."""
        return self.tokenizer.encode(text).ids or [self.start_token]


def load_model(ckpt_path: str | Path, device: str = "cpu") -> Loaded:
    """``load_for_inference`` with the chat format and a name; a checkpoint without a tokenizer is refused."""
    model, tokenizer, ids, ckpt = _load(ckpt_path, device)
    if tokenizer is None:
        raise UserError(f"{ckpt_path}: no tokenizer in the checkpoint nor in its run directory")
    chat = ChatFormat.of(ckpt, tokenizer, ids, ckpt_path)
    return Loaded(model, tokenizer, ids, chat, Path(ckpt_path).stem)


def load_for_inference(ckpt_path: str | Path, device: str = "cpu") -> tuple[Transformer, Any, dict[str, Any]]:
    """(model in eval mode, tokenizers.Tokenizer or None, special token ids) from a training or converted checkpoint.

    The tokenizer is the checkpoint's own, else the run directory's `tokenizer.json` next to `checkpoints/`.

    The model is built on the meta device and materialised empty, so the checkpoint's weights are the only
    initialisation (no random init of a large model just to overwrite it).
    """
    model, tokenizer, ids, _ = _load(ckpt_path, device)
    return model, tokenizer, ids


def _load(ckpt_path: str | Path, device: str) -> tuple[Transformer, Any, dict[str, Any], dict[str, Any]]:
    from tokenizers import Tokenizer

    ckpt = checkpoint.load(ckpt_path)
    cfg = checkpoint.model_config_of(ckpt, ckpt_path)
    state = checkpoint.model_state(ckpt, cfg, ckpt_path)  # names and shapes checked
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"device={device!r}: {err}") from err
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)  # re-ties a tied head (Transformer._apply)
    model.rope.reset_parameters()  # the rotary tables are computed, not loaded
    model.load_state_dict(state, strict=not cfg.tie_embeddings)  # a tied checkpoint may lack output.weight
    tokenizer_json = ckpt.get("tokenizer")
    if tokenizer_json is None:
        candidate = Path(ckpt_path).resolve().parent.parent / "tokenizer.json"  # <run_dir>/checkpoints/x.ckpt
        if candidate.is_file():
            tokenizer_json = candidate.read_text(encoding="utf-8")
            ckpt = {**ckpt, "tokenizer": tokenizer_json}
    tokenizer = None if tokenizer_json is None else Tokenizer.from_str(tokenizer_json)
    return model.eval(), tokenizer, checkpoint.special_ids(ckpt), ckpt


class ChatFormat:
    """A conversation's prompt tokens, in the format the model was finetuned on.

    A checkpoint finetuned here stores our template (``chat_format``, datamodules.sft.ChatTemplate): the prompt is
    encoded as in training, piece by piece (``encode_conversations``), so the tokens are exactly those the model
    learnt. A converted Hugging Face model brings its Jinja ``chat_template``, rendered in Jinja's sandbox (a
    template is data: it cannot reach Python objects or files) and encoded whole, as transformers does.
    """

    def __init__(self, tokenizer: Any, ids: dict[str, Any], *, ours: str | None = None, jinja: str | None = None):
        self.tokenizer, self.ids, self.jinja_source = tokenizer, ids, jinja
        self.ours = None
        if ours is not None:
            from datamodules.sft import ChatTemplate

            self.ours = ChatTemplate(ours)
        elif jinja is not None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as err:
                raise UserError("this checkpoint's chat template is Jinja: pip install jinja2") from err
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._jinja = env.from_string(jinja)

    @classmethod
    def of(cls, ckpt: dict[str, Any], tokenizer: Any, ids: dict[str, Any], path: Any) -> ChatFormat | None:
        if ckpt.get("chat_format"):
            return cls(tokenizer, ids, ours=ckpt["chat_format"])
        if ckpt.get("chat_template"):
            return cls(tokenizer, ids, jinja=ckpt["chat_template"])
        return None

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of ``messages`` followed by the assistant's generation prompt."""
        if self.ours is not None:
            from datamodules.sft import ASSISTANT, encode_conversations

            bos = self.ids["bos"] if self.ids.get("bos") is not None else self.ids["eos"]
            ids, _, last = encode_conversations(
                self.tokenizer, self.ours, [[*messages, {"role": ASSISTANT, "content": ""}]], bos, self.ids["eos"]
            )[0]
            return ids[:last].tolist()

        def token(role: str) -> str:
            return "" if self.ids.get(role) is None else self.tokenizer.id_to_token(self.ids[role])

        try:
            text = self._jinja.render(
                messages=messages, add_generation_prompt=True, bos_token=token("bos"), eos_token=token("eos")
            )
        except Exception as err:  # a template error or one it raises itself (raise_exception is undefined here)
            raise UserError(f"the checkpoint's chat template failed on these messages: {err}") from err
        return self.tokenizer.encode(text, add_special_tokens=False).ids


class TextStream:
    """One row's new tokens as text, as they come, cut at the first stop string.

    ``push(token)`` returns the text that is now certain: a byte-level BPE token may end in the middle of a UTF-8
    character (decoded as U+FFFD until the rest comes), and text that could be the start of a stop string is held
    back until it is not. When a stop string appears, ``stopped`` becomes True and the text before it is the last
    returned; the stop string itself is never returned (OpenAI's ``stop``). ``flush()`` returns what was held back
    when the row ends otherwise. Special tokens are left out of the text, as ``llm.generate`` prints it.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # returned so far
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        # Decoding the whole row each time keeps byte-level merges right; rows are at most max_seq_len tokens.
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return ""
        hits = [(i, s) for s in self.stop if (i := full.find(s, max(0, len(self.text) - len(s) + 1))) >= 0]
        if hits:
            end = min(i for i, _ in hits)
            self.stopped = True
            return self._emit(full[:end])
        hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        return self._emit(full[: len(full) - hold])

    def flush(self) -> str:
        if self.stopped or not self.ids:
            return ""
        return self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        new = upto[len(self.text) :] if len(upto) > len(self.text) else ""
        self.text += new
        return new


DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,
    "prompt": "",
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "seed": 0,
    "device": "cpu",
    "allow_unsafe_checkpoint": False,  # true: plain pickle, which runs any code the file holds (trusted files only)
}


def _parse(argv: list[str]) -> Any:
    args = parse_key_values(argv, DEFAULTS)
    for key, kind in [("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float), ("seed", int)]:
        value = args[key]
        if value is not None:
            try:
                args[key] = kind(value)
            except (TypeError, ValueError) as err:
                raise UserError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from err
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        safe_load.allow_unsafe(args.allow_unsafe_checkpoint)
        model, tokenizer, ids = load_for_inference(args.ckpt_path, args.device)
        if tokenizer is None:
            raise UserError(f"{args.ckpt_path}: no tokenizer in the checkpoint nor in its run directory")
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [str(p) for p in args.prompt] if not isinstance(args.prompt, (str, int, float)) else [str(args.prompt)]
    start_token = next((ids[r] for r in ("bos", "eos") if ids.get(r) is not None), 0)
    encoded = [tokenizer.encode(p).ids or [start_token] for p in prompts]  # an empty prompt starts from BOS
    start = time.perf_counter()
    new = generate(
        model,
        encoded,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=ids["eos_ids"],
        pad_id=ids["pad"] if ids.get("pad") is not None else 0,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    print("\n---\n".join(prompt + tokenizer.decode(tokens) for prompt, tokens in zip(prompts, new)))
    n = sum(len(t) for t in new)
    print(f"[{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
