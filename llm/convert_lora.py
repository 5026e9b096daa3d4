"""LoRA adapter checkpoints out: merged into one of our full checkpoints, or as a PEFT adapter.

    python -m llm.convert merge CKPT OUT_CKPT [--base PATH]
    python -m llm.convert to-hf CKPT OUT_DIR --adapter-only [--base-model HF_DIR_OR_NAME] [--base PATH]

(`to-hf` without `--adapter-only` writes the merged model: llm/convert.py.) An adapter checkpoint holds the
adapters only and names its base checkpoint by path and sha256 (llm/training/adapters.py); `--base` gives a base
that moved, checked against the same hash.

PEFT's format is what peft 0.21's `save_pretrained` writes and `PeftModel.from_pretrained` reads (vLLM's
`--enable-lora` reads it too; untested here): adapter_config.json, and adapter_model.safetensors with, per adapted
projection, `base_model.model.<HF Llama name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). PEFT scales
B A by lora_alpha / r as we do, and our lora_a / lora_b have those shapes, so the tensors are written unchanged.

A QLoRA adapter (adapter=qlora) was trained on the NF4-rounded base; merged, it lands on the full-precision weights
the base checkpoint holds (as PEFT's merge_and_unload onto an unquantized base does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm.convert import to_hf_name, write_tokenizer_files
from llm.core import lora
from llm.errors import UserError
from llm.training import checkpoint
from llm.training.checkpoint import HEAD, PREFIX

PEFT_PREFIX = "base_model.model."  # PeftModel -> LlamaForCausalLM, as in PEFT's saved names
_PEFT_KEYS = {"lora_a": "lora_A", "lora_b": "lora_B"}
# training state a merged checkpoint does not carry (it is weights only, like a consolidated one)
_TRAINING_STATE = ("adapter", "loops", "optimizer_states", "lr_schedulers", "callbacks")


def _adapter_config(ckpt: dict[str, Any], path: str | Path) -> lora.LoRAConfig:
    if "adapter" not in ckpt:
        raise UserError(f"{path}: has no adapters (a full checkpoint); export it with to-hf without --adapter-only")
    return lora.LoRAConfig.from_dict(ckpt["adapter"]["config"])


def hf_module(target: str) -> str:
    """Our projection name (wq, w1, ...) -> Hugging Face Llama's module name (q_proj, gate_proj, ...)."""
    return to_hf_name(f"layers.0.{lora.TARGETS[target]}.{target}.weight").split(".")[-2]


def peft_name(name: str) -> str:
    """`layers.3.attention.wq.lora_a` -> `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    layer, _, key = name.rpartition(".")
    return f"{PEFT_PREFIX}{to_hf_name(layer + '.weight').removesuffix('.weight')}.{_PEFT_KEYS[key]}.weight"


def adapter_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The adapters by our names (`layers.0.attention.wq.lora_a`), one pair per target of every block, shapes
    checked against the checkpoint's model config."""
    cfg = checkpoint.model_config_of(ckpt, path)
    adapter = _adapter_config(ckpt, path)
    state = {
        k[len(PREFIX) :].replace("_orig_mod.", ""): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(PREFIX) and lora.is_adapter_key(k)
    }
    shapes = checkpoint.expected_shapes(cfg)
    layers = [f"layers.{i}.{lora.TARGETS[t]}.{t}" for i in range(cfg.n_layers) for t in adapter.targets]
    expected = {}
    for layer in layers:
        out, inp = shapes[f"{layer}.weight"]
        expected[f"{layer}.lora_a"], expected[f"{layer}.lora_b"] = (adapter.rank, inp), (out, adapter.rank)
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise UserError(f"{path}: its adapter tensors do not match its adapter config ({', '.join(odd[:3])})")
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, its adapter config implies {expected[name]}")
    return state


def peft_config(adapter: lora.LoRAConfig, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json: the fields PEFT's LoraConfig reads for plain LoRA (the others keep its defaults)."""
    alpha = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted(hf_module(t) for t in adapter.targets),
        "bias": "none",
        "fan_in_fan_out": False,  # our weights are (out, in), as nn.Linear's
        "use_rslora": False,  # scale alpha / r, not alpha / sqrt(r)
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def to_peft(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a PEFT LoRA adapter directory (plus the tokenizer files, for the chat template) from an adapter
    checkpoint. The base is not read unless `base` is given (then it is checked against the recorded hash);
    `base_model` goes into adapter_config.json as `base_model_name_or_path` (e.g. the base's to-hf directory)."""
    from safetensors.torch import save_file

    ckpt = checkpoint.load(ckpt_path, base=base) if base is not None else checkpoint.load_meta(ckpt_path)
    adapter = _adapter_config(ckpt, ckpt_path)
    if checkpoint.labels_of(ckpt) is not None or checkpoint.head_state(ckpt):
        raise UserError(
            f"{ckpt_path}: a classifier's adapters: its head is no part of a PEFT LoRA adapter of a causal LM;"
            " write a full checkpoint with `merge` instead"
        )
    state = adapter_state(ckpt, ckpt_path)
    tensors = {peft_name(k): (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config(adapter, base_model), indent=2) + "\n")
    if ckpt.get("tokenizer"):
        cfg = checkpoint.model_config_of(ckpt, ckpt_path)
        write_tokenizer_files(ckpt, out, cfg, checkpoint.special_ids(ckpt))
    return out


def merge(ckpt_path: str | Path, out_ckpt: str | Path, *, base: str | Path | None = None) -> Path:
    """Write one of our full checkpoints from an adapter checkpoint: W + (alpha / r) B A in W's dtype, a
    classifier's head and labels, the tokenizer and chat template kept; no adapters, no optimizer or loop state
    (so `init_from=`, `llm.generate` and `to-hf` read it as any weights-only checkpoint)."""
    ckpt = checkpoint.load(ckpt_path, base=base)
    if "adapter" not in ckpt:
        raise UserError(f"{ckpt_path}: has no adapters; it is a full checkpoint already (nothing to merge)")
    cfg = checkpoint.model_config_of(ckpt, ckpt_path)
    state = {PREFIX + k: v for k, v in checkpoint.model_state(ckpt, cfg, ckpt_path, merge=True).items()}
    state.update({HEAD + k: v for k, v in checkpoint.head_state(ckpt).items()})
    merged = {k: v for k, v in ckpt.items() if k not in _TRAINING_STATE}
    merged["state_dict"] = state
    merged["hyper_parameters"] = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k != "adapter"}
    out = Path(out_ckpt)
    from llm.training.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(merged, out)  # tmp + fsync + rename; a full disk in one line
    return out
