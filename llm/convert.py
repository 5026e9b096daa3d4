"""Hugging Face Llama (Qwen3 with model.qk_norm) <-> our checkpoints.

    python -m llm.convert to-hf CKPT OUT_DIR [--max-shard-gb 5] [--dtype bfloat16] [--base BASE_CKPT]
    python -m llm.convert to-hf CKPT OUT_DIR --adapter-only [--base-model HF_DIR]   # a PEFT LoRA adapter
    python -m llm.convert merge CKPT OUT_CKPT [--base BASE_CKPT]                    # LoRA folded in: full checkpoint
    python -m llm.convert from-hf HF_DIR OUT_CKPT

`to-hf` writes what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` read: config.json (LlamaForCausalLM; Qwen3ForCausalLM for a model with
`qk_norm`, which Llama cannot express), model.safetensors (or
model-0000i-of-0000n.safetensors shards and model.safetensors.index.json above `max_shard_bytes`),
tokenizer.json, tokenizer_config.json and special_tokens_map.json. `from-hf` writes the reverse: a checkpoint
with our layout, which `init_from=` and `llm.generate` accept:

    {"state_dict": {"model.<our name>": tensor}, "hyper_parameters": {"model": ModelConfig.to_dict()},
     "tokenizer": tokenizer.json as a string, "special_tokens": {"bos", "eos", "pad", "eos_ids"},
     "hf_tokenizer_config": the original tokenizer_config.json (written back by to-hf),
     "chat_template": the Jinja chat template, when the model has one}

`special_tokens` holds ids (or None); `eos` is one id, `eos_ids` every id that ends a sequence (Llama 3
lists several as `eos_token_id`). Our training checkpoints carry no `special_tokens`: the roles are then read
from the tokenizer the same way the DataModule does.

Our parameter layout is Hugging Face's up to names: the rotary embedding uses the same "rotate half" pairing,
so no query/key permutation is needed and the mapping is one name for one name. Tensors are copied bit for
bit in their stored dtype (unless to-hf is given a dtype), so both round trips are lossless.

Memory: the checkpoint is memory-mapped, so only the tensors being written are read; to-hf writes one shard
at a time (peak about one shard), from-hf holds one copy of the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from llm.core.config import ROPE_SCALING_KEYS, ModelConfig
from llm.errors import LLMError, UserError
from llm.training import safe_load
from llm.training.checkpoint import PREFIX, ROLES, expected_shapes, load, model_config_of, model_state, special_ids

# our name (inside the Transformer) -> Hugging Face LlamaForCausalLM name (Qwen3ForCausalLM: the same plus q/k norms)
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES_INV = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_TOP_NAMES_INV = {hf: ours for ours, hf in _TOP_NAMES.items()}

MAX_SHARD_BYTES = 5 * 10**9  # transformers 4's default shard size (5 GB); also bounds to-hf's peak memory
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_hf_name(name: str) -> str:
    """Our parameter name (e.g. `layers.3.attention.wq.weight`) -> Hugging Face Llama's (and Qwen3's)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        if i.isdigit() and rest in _LAYER_NAMES:
            return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    raise KeyError(name)


def from_hf_name(name: str) -> str:
    """Hugging Face Llama parameter name -> ours (inverse of to_hf_name)."""
    if name in _TOP_NAMES_INV:
        return _TOP_NAMES_INV[name]
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        if i.isdigit() and rest in _LAYER_NAMES_INV:
            return f"layers.{i}.{_LAYER_NAMES_INV[rest]}"
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ configs


def hf_config(cfg: ModelConfig, special: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json of LlamaForCausalLM (of Qwen3ForCausalLM with qk_norm), readable by transformers 4 and 5.

    transformers 5 reads `rope_parameters` ({rope_type, rope_theta, scaling keys}); 4 reads `rope_theta` and
    `rope_scaling` (whose llama3 validation rejects an unknown `rope_theta` key inside it). Writing both spellings
    is how transformers 5 itself stays readable by 4, and 5 gives `rope_scaling` priority, so they must agree.

    Qwen3's decoder is Llama's (rotate-half RoPE, SwiGLU, RMSNorm gains after the float32 normalisation, optional tied
    head) plus RMSNorm(head_dim, rms_norm_eps) of each query and key head before RoPE: our qk_norm. Its two options
    beyond that are set off to match ours: biases on q/k/v/o (attention_bias) and sliding-window attention.
    """
    scaling = None
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **{k: cfg.rope_scaling[k] for k in ROPE_SCALING_KEYS}}
        rope = {**scaling, "rope_theta": cfg.rope_theta}
    eos = special.get("eos_ids") or special.get("eos")
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the transformers < 4.56 spelling
        "use_cache": True,
        "bos_token_id": special.get("bos"),
        "eos_token_id": eos,
        "pad_token_id": special.get("pad"),
    }
    if not cfg.qk_norm:
        return config
    llama_only = ("mlp_bias", "pretraining_tp")  # Qwen3's MLP never has biases; pretraining_tp is Llama 2's
    config = {k: v for k, v in config.items() if k not in llama_only}
    sliding_off = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    return {**config, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **sliding_off}


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling) from either spelling, with transformers 5's priorities.

    transformers 5 takes `rope_scaling` over `rope_parameters` when both are present, and a `rope_theta` inside the
    dict over the top-level key; a llama3 dict without `original_max_position_embeddings` uses
    `max_position_embeddings`.
    """
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise UserError(f"{where}: per-layer-type rope_parameters are not supported (not a plain Llama)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(f"{where}: rope scaling type {rope_type!r} is not supported (only llama3)")
    rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    missing = [k for k in ROPE_SCALING_KEYS if k not in rope]
    if missing:
        raise UserError(f"{where}: llama3 rope scaling without {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: rope[k] for k in ROPE_SCALING_KEYS}}


# transformers' defaults for the keys a config.json may leave out (LlamaConfig's, Qwen3Config's); head_dim None:
# hidden_size / num_attention_heads
_HF_DEFAULTS = {
    "llama": {"vocab_size": 32000, "max_position_embeddings": 2048, "head_dim": None},
    "qwen3": {"vocab_size": 151936, "max_position_embeddings": 32768, "head_dim": 128},
}


def config_from_hf(hf: dict[str, Any], where: str | Path) -> ModelConfig:
    """Our ModelConfig from a LlamaForCausalLM or Qwen3ForCausalLM config.json (transformers 4 or 5); what we cannot
    run is an error naming the key."""
    where = str(where)
    if hf.get("model_type") not in _HF_DEFAULTS:
        raise UserError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama' or 'qwen3'")
    hf = {**_HF_DEFAULTS[hf["model_type"]], **hf}
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise UserError(f"{where}: {key}=true is not supported (no biases, no sliding window here)")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise UserError(f"{where}: layer_types other than full_attention are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in hf
    ]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise UserError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    try:
        return ModelConfig(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=hf["max_position_embeddings"],
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            qk_norm=hf["model_type"] == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
    except ValueError as err:
        raise UserError(f"{where}: {err}") from err


# -------------------------------------------------------------------------------------------------- to-hf


def write_tokenizer_files(ckpt: dict[str, Any], out: Path, cfg: ModelConfig, ids: dict[str, Any]) -> None:
    """tokenizer.json plus tokenizer_config.json and special_tokens_map.json, which name the special tokens."""
    from tokenizers import Tokenizer

    tokenizer_json = ckpt["tokenizer"]
    tok = Tokenizer.from_str(tokenizer_json)
    special = {f"{role}_token": tok.id_to_token(ids[role]) for role in ROLES if ids.get(role) is not None}
    config = ckpt.get("hf_tokenizer_config")  # the original file of a model converted with from-hf
    if config:
        config = {**config, **{k: v for k, v in special.items() if config.get(k) is None}}
    else:
        # PreTrainedTokenizerFast (transformers 5: TokenizersBackend) runs tokenizer.json exactly as the tokenizers
        # library does; a Llama tokenizer class would rebuild the pipeline from the vocabulary instead.
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            **special,
        }
    if ckpt.get("chat_template"):  # Jinja, from from-hf or from finetuning with a chat template
        config["chat_template"] = ckpt["chat_template"]
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _shards(state: dict[str, torch.Tensor], max_bytes: int, dtype: torch.dtype | None) -> list[list[str]]:
    """Tensor names grouped in file order into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def to_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    base: str | Path | None = None,
) -> Path:
    """Write a Hugging Face Llama (Qwen3 with qk_norm) directory from one of our checkpoints (training or converted).

    dtype: cast the weights (e.g. torch.bfloat16 to halve the files); None keeps them bit for bit.
    A LoRA adapter checkpoint is written merged (W + (alpha / r) B A); `base`: its base checkpoint, if it moved.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise UserError(f"max shard size must be positive, got {max_shard_bytes} bytes")
    ckpt = load(ckpt_path, base=base)
    cfg = model_config_of(ckpt, ckpt_path)
    state = model_state(ckpt, cfg, ckpt_path)
    if cfg.tie_embeddings:
        state.pop("output.weight", None)  # Hugging Face ties lm_head to embed_tokens; safetensors refuses aliases
    # HF's order (embeddings, layers in order, norm, head) keeps each shard's layers together
    order = {name: i for i, name in enumerate(expected_shapes(cfg))}
    state = dict(sorted(state.items(), key=lambda kv: order[kv[0]]))
    ids = special_ids(ckpt)
    stored_dtypes = {t.dtype for t in state.values()}
    out_dtype = dtype or (stored_dtypes.pop() if len(stored_dtypes) == 1 else torch.float32)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous export with another sharding would confuse the loader
    (out / "config.json").write_text(json.dumps(hf_config(cfg, ids, out_dtype), indent=2) + "\n")
    if ckpt.get("tokenizer"):
        write_tokenizer_files(ckpt, out, cfg, ids)

    shards = _shards(state, max_shard_bytes, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # only this shard's tensors are read from the memory-mapped checkpoint (and copied by save_file)
        tensors = {}
        for name in names:
            t = state[name] if dtype is None else state[name].to(dtype)
            tensors[to_hf_name(name)] = t.contiguous()
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ from-hf


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / f for f in files]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(hf_dir.glob("*.bin")):
        raise UserError(f"{hf_dir}: only PyTorch .bin weights; re-save the model with safetensors")
    raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def _hf_special_tokens(hf_dir: Path, hf: dict[str, Any], tokenizer_json: str | None) -> dict[str, Any]:
    """Special token ids: config.json first, then generation_config.json, then the tokenizer files' token strings."""
    generation = _read_json(hf_dir / "generation_config.json")
    token_files = [_read_json(hf_dir / "tokenizer_config.json"), _read_json(hf_dir / "special_tokens_map.json")]
    tok = None
    if tokenizer_json:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
    ids: dict[str, Any] = {}
    for role in ROLES:
        value = hf.get(f"{role}_token_id", generation.get(f"{role}_token_id"))
        if value is None and tok is not None:
            for f in token_files:
                token = f.get(f"{role}_token")
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and tok.token_to_id(token) is not None:
                    value = tok.token_to_id(token)
                    break
        ids[role] = value
    eos = ids["eos"]
    ids["eos_ids"] = [int(i) for i in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
    ids["eos"] = ids["eos_ids"][0] if ids["eos_ids"] else None
    return ids


def from_hf(hf_dir: str | Path, out_ckpt: str | Path) -> Path:
    """Write a checkpoint in our layout from a Hugging Face Llama or Qwen3 directory, tokenizer included."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(config_path)
    cfg = config_from_hf(hf, config_path)
    expected = expected_shapes(cfg)

    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in _hf_weight_files(hf_dir):
        if not file.is_file():
            raise UserError(f"{file}: listed in the index but missing")
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer old exports carry; we recompute it from the config
                try:
                    ours = from_hf_name(name)
                except KeyError:
                    ours = None
                if ours not in expected:  # not ours, or not this config's (q_norm of a Llama config)
                    unexpected.append(name)
                    continue
                if ours == "output.weight" and cfg.tie_embeddings:
                    continue  # a tied head saved anyway: transformers ignores it too
                state[PREFIX + ours] = f.get_tensor(name)
    if cfg.tie_embeddings and PREFIX + "tok_embeddings.weight" in state:
        state[PREFIX + "output.weight"] = state[PREFIX + "tok_embeddings.weight"]  # one tensor, saved once
    missing = sorted(set(expected) - {k[len(PREFIX) :] for k in state})
    if unexpected or missing:
        missing_hf = [to_hf_name(n) for n in missing]
        raise UserError(
            f"{hf_dir}: weights do not match config.json"
            f" (missing: {', '.join(missing_hf[:3]) or '-'}; unexpected: {', '.join(unexpected[:3]) or '-'})"
        )
    for name, t in state.items():
        if tuple(t.shape) != expected[name[len(PREFIX) :]]:
            raise UserError(f"{hf_dir}: {to_hf_name(name[len(PREFIX) :])} has shape {tuple(t.shape)}")

    tokenizer_file = hf_dir / "tokenizer.json"
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    ckpt: dict[str, Any] = {
        "state_dict": state,
        "hyper_parameters": {"model": cfg.to_dict()},
        "special_tokens": _hf_special_tokens(hf_dir, hf, tokenizer_json),
    }
    if tokenizer_json is not None:
        ckpt["tokenizer"] = tokenizer_json
        tokenizer_config = _read_json(hf_dir / "tokenizer_config.json")
        if tokenizer_config:
            ckpt["hf_tokenizer_config"] = tokenizer_config
        template = tokenizer_config.get("chat_template")
        if template is None and (hf_dir / "chat_template.jinja").is_file():  # transformers 5 keeps it apart
            template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, str):
            ckpt["chat_template"] = template
    out = Path(out_ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)  # a crash never leaves a half-written checkpoint under the final name
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llm.convert", description="Hugging Face Llama/Qwen3 <-> ours")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face directory")
    p.add_argument("ckpt")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="shard above this size (GB)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights (default: as stored)")
    p.add_argument("--base", default=None, help="a LoRA checkpoint's base checkpoint, if it moved")
    p.add_argument("--adapter-only", action="store_true", help="a LoRA checkpoint's adapters alone, as PEFT's")
    p.add_argument("--base-model", default=None, help="with --adapter-only: base_model_name_or_path (its HF dir)")
    p = sub.add_parser("merge", help="LoRA adapter checkpoint -> our full checkpoint, adapters merged")
    p.add_argument("ckpt")
    p.add_argument("out_ckpt")
    p.add_argument("--base", default=None, help="the base checkpoint, if it moved")
    p = sub.add_parser("from-hf", help="Hugging Face directory -> our checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")
    for p in sub.choices.values():  # from-hf reads safetensors only; the others read one of our checkpoints
        p.add_argument(safe_load.CLI_FLAG, action="store_true", help=safe_load.CLI_HELP)
    args = parser.parse_args(argv)
    try:
        from llm import convert_lora  # imports this module: not at the top

        safe_load.allow_unsafe(args.allow_unsafe_checkpoint)
        if args.command == "to-hf":
            dtype = _DTYPES[args.dtype] if args.dtype else None
            if args.adapter_only:
                out = convert_lora.to_peft(
                    args.ckpt, args.out_dir, base=args.base, base_model=args.base_model, dtype=dtype
                )
            elif args.base_model is not None:
                raise UserError("--base-model names the base of an adapter: it goes with --adapter-only")
            else:
                shard = int(args.max_shard_gb * 1e9)
                out = to_hf(args.ckpt, args.out_dir, max_shard_bytes=shard, dtype=dtype, base=args.base)
        elif args.command == "merge":
            out = convert_lora.merge(args.ckpt, args.out_ckpt, base=args.base)
        else:
            out = from_hf(args.hf_dir, args.out_ckpt)
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
