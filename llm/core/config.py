"""ModelConfig: the one typed description of a Llama-style decoder.

Named sizes live in `conf/model/*.yaml` and are built with `hydra.utils.instantiate`. Fields that can be
derived (`n_kv_heads`, `ffn_dim`) are resolved in `__post_init__`, so every other module reads plain ints;
`vocab_size` may stay `None` until the tokenizer is known, then `with_vocab` fills it in.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm.errors import UserError

# Keys of a Llama 3 `rope_scaling` dict, as in Hugging Face configs ("type" is the older spelling of "rope_type").
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary size up to a multiple of `multiple` (matmuls on GPUs like round shapes)."""
    if n <= 0:
        raise UserError(f"vocabulary size must be positive, got {n}")
    return multiple * math.ceil(n / multiple)


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention); fewer -> grouped-query attention
    ffn_dim: int | None = None  # None -> Llama rule from dim, ffn_dim_multiplier and multiple_of
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    vocab_size: int | None = None  # None -> follow the tokenizer (see with_vocab)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm of each query and key head over head_dim, before RoPE (Qwen3's QK-norm)
    tie_embeddings: bool = False
    dropout: float = 0.0  # on attention probabilities and on each residual branch
    compile: bool = False  # read by the training code; the model ignores it
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            _check_positive_int(name, getattr(self, name))
        if self.dim % self.n_heads != 0:
            raise UserError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            raise UserError(
                f"head_dim = model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings"
            )

        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")

        if self.ffn_dim is None:
            # Llama: two thirds of 4*dim keeps SwiGLU's three matrices at the cost of a 4*dim two-matrix MLP.
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                if self.ffn_dim_multiplier <= 0:
                    raise UserError(f"model.ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.ffn_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        _check_positive_int("ffn_dim", self.ffn_dim)

        if self.vocab_size is not None:
            _check_positive_int("vocab_size", self.vocab_size)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise UserError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise UserError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if not isinstance(self.qk_norm, bool):
            raise UserError(f"model.qk_norm must be true or false, got {self.qk_norm!r}")
        if self.init_std <= 0:
            raise UserError(f"model.init_std must be positive, got {self.init_std}")
        self.rope_theta = float(self.rope_theta)
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_vocab(self, n_tokenizer: int) -> ModelConfig:
        """A copy whose vocab_size fits a tokenizer of `n_tokenizer` tokens (padded to a multiple of 64 if unset)."""
        if self.vocab_size is None:
            return dataclasses.replace(self, vocab_size=pad_vocab(n_tokenizer))
        if self.vocab_size < n_tokenizer:
            raise UserError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary ({n_tokenizer});"
                " set model.vocab_size=null to follow the tokenizer"
            )
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of to_dict; unknown keys are an error (a checkpoint from another model is not silently half-read)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items()})


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"model.{name} must be a positive integer, got {value!r}")


def _check_rope_scaling(rope_scaling: Mapping[str, Any]) -> dict[str, Any]:
    scaling = dict(rope_scaling)  # also turns an OmegaConf DictConfig into a plain dict
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise UserError(f"model.rope_scaling: only rope_type 'llama3' is supported, got {rope_type!r}")
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise UserError(f"model.rope_scaling is missing keys: {', '.join(missing)}")
    unknown = sorted(set(scaling) - set(ROPE_SCALING_KEYS) - {"rope_type", "type"})
    if unknown:
        raise UserError(f"model.rope_scaling has unknown keys: {', '.join(unknown)}")
    if scaling["factor"] <= 0 or scaling["original_max_position_embeddings"] <= 0:
        raise UserError("model.rope_scaling: factor and original_max_position_embeddings must be positive")
    if not 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise UserError("model.rope_scaling: need 0 < low_freq_factor < high_freq_factor")
    return scaling
