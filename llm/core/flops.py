"""Parameter counts and training FLOPs per token, from the config alone.

The one source for the memory planner (llm/plan.py) and the throughput/MFU callback. A test checks
count_params against the parameters of a model built on the meta device, for every conf/model/*.yaml.

Definitions
- total parameters: every distinct tensor; a tied output head is the embedding matrix and counts once.
- non-embedding parameters (embedding=False): total minus the token embedding, minus the output head when it
  is untied, i.e. the Transformer blocks and the final norm. This is the N of Kaplan et al. scaling laws.
- FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 * N_matmul + 12 * n_layers * dim * seq_len, where
  N_matmul = non-embedding parameters + the output head (vocab_size * dim), tied or not: the embedding lookup is a
  gather, not a matmul, but the output projection is a real (dim x vocab) matmul for every token.
  6 = 2 (multiply + add) x 3 (forward, plus backward for activations and for weights). The norm weights are
  counted in N although they are elementwise (negligible: 2 * dim per layer, plus 2 * head_dim with qk_norm, whose
  normalisation of q and k is not counted either). The attention term counts the full T x T score and value matmuls
  (QK^T and AV) like PaLM, not halved for the causal mask; it depends on n_heads * head_dim = dim, so grouped-query
  attention does not change it. Recomputation for activation checkpointing is not counted (MFU, not HFU).
"""

from __future__ import annotations

from llm.core.config import ModelConfig


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None: counts need it (use cfg.with_vocab(tokenizer vocab size))")
    return cfg.vocab_size


def layer_norm_params(cfg: ModelConfig) -> int:
    """The RMSNorm gains of one block: before attention and before the MLP (dim each), and with qk_norm one gain of
    head_dim for the queries and one for the keys (shared by the heads)."""
    return 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0)


def norm_params(cfg: ModelConfig) -> int:
    """Every RMSNorm gain of the model (the blocks' and the final norm's): elementwise, never a matmul."""
    return cfg.n_layers * layer_norm_params(cfg) + cfg.dim


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one Transformer block: attention, SwiGLU feed-forward and the RMSNorm gains."""
    q_and_o = 2 * cfg.dim * cfg.n_heads * cfg.head_dim
    k_and_v = 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
    feed_forward = 3 * cfg.dim * cfg.ffn_dim
    return q_and_o + k_and_v + feed_forward + layer_norm_params(cfg)


def count_params(cfg: ModelConfig, *, embedding: bool = True) -> int:
    """Total parameters (tied head counted once), or non-embedding ones with embedding=False (see module doc)."""
    non_embedding = cfg.n_layers * layer_params(cfg) + cfg.dim  # blocks + final norm
    if not embedding:
        return non_embedding
    embed = _vocab(cfg) * cfg.dim
    head = 0 if cfg.tie_embeddings else embed
    return non_embedding + embed + head


def matmul_params(cfg: ModelConfig) -> int:
    """The N of 6N: non-embedding parameters plus the output head (a matmul even when tied)."""
    return count_params(cfg, embedding=False) + _vocab(cfg) * cfg.dim


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of the attention scores and weighted sum: 12 * L * dim * T.

    Forward alone is a third of it: per layer 2 matmuls (QK^T, AV) of 2 * dim * T FLOPs each per token.
    """
    return float(12 * cfg.n_layers * cfg.dim * seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context length seq_len (PaLM appendix B, see module doc)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
