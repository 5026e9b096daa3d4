"""A Llama-style decoder-only Transformer, architecture only.

Reading order: RMSNorm, rotary embeddings, Attention, FeedForward, Block, KVCache, Transformer (the masks it builds
are in llm/core/masks.py).
Shapes: B batch, T new tokens, S keys attended to (T, or cached + new), H query heads, K key/value heads,
D head_dim, C model dim, V vocabulary.

The layout matches Hugging Face Llama one to one (rotate-half RoPE, RMSNorm in float32, SwiGLU, no biases), and
with `qk_norm` Qwen3 (Llama plus a per-head RMSNorm of queries and keys), so their weights load by renaming alone;
the names' mapping belongs to the conversion module, not here.
Training, parallelism and compilation are applied from outside (see llm/training/parallelize.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.core import masks
from llm.core.config import ModelConfig

# `enable_gqa` lets SDPA share K/V heads without materialising the repeats (PyTorch >= 2.5).
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class Linear(nn.Linear):
    """Bias-free Linear drawn from N(0, std).

    Keeping `std` on the layer means `reset_parameters()` alone re-creates the intended init: Lightning
    materialises a meta-device model by calling `reset_parameters()` on each leaf module, not on the model.
    """

    def __init__(self, in_features: int, out_features: int, std: float) -> None:
        self.std = std  # set before nn.Linear.__init__, which calls reset_parameters
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class Embedding(nn.Embedding):
    """Token embedding drawn from N(0, std) (PyTorch's default is N(0, 1)); see Linear for why std is kept."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float) -> None:
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as HF Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # the same float32 arithmetic as below, bit for bit, and the same tensors saved for backward, in one
            # call (fewer Python-level ops: it counts when decoding a token at a time)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2, in float32; with Llama 3 scaling when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones are kept, and the
    # band in between is interpolated smoothly. Same arithmetic as HF's _compute_llama3_parameters.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, shape (max_seq_len, D), in float32.

    "Rotate-half" layout: dimension i pairs with i + D/2 (not 2i with 2i+1 as in the original complex form).
    The tables are non-persistent buffers: derived from the config, never saved, recomputed by reset_parameters.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len = cfg.head_dim, cfg.max_seq_len
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling
        self.register_buffer("cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device=device)  # (D/2,)
        pos = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # (max_seq_len, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, D)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(
        self,
        input_pos: torch.Tensor | None = None,
        *,
        start: int = 0,
        length: int = 0,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for apply_rope, in `dtype` (default float32), ready to broadcast over heads.

        input_pos (T,) or (B, T) -> shape (T, D) or (B, 1, T, D); without input_pos, positions start..start+length-1
        (a slice of the tables, no gather). The sin carries rotate-half's sign: -sin on the first half of D, so that
        rotate_half(x) * sin == x.roll(D/2, -1) * signed sin (the same products: only where the minus sits moves).
        """
        if input_pos is None:
            cos, sin = self.cos[start : start + length], self.sin[start : start + length]
        else:  # a gather of rows; F.embedding is the cheapest one for any shape of positions
            cos, sin = F.embedding(input_pos, self.cos), F.embedding(input_pos, self.sin)
            if input_pos.ndim == 2:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if dtype is not None and dtype != cos.dtype:  # once per forward, not in every layer
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos and signed sin from RotaryEmbedding.

    Hugging Face's x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) computed as x.roll(D/2) times
    the sign folded into sin: the same values bit for bit, in 4 ops instead of 9.
    """
    if cos.dtype != x.dtype:  # the tables come in the compute dtype; this is a fallback for direct callers
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_dtype(device_type: str, dtype: torch.dtype, cached: bool) -> torch.dtype:
    """The dtype SDPA computes in for q, k, v of `dtype`: float32 instead of bf16 on the CPU, except with a cache.

    PyTorch's CPU flash attention runs its backward much faster in float32 than in bf16 (a layer of the default
    model, 16 x 256 tokens, 8 heads of 32: python bench/cpu_kernels.py), more than the casts cost, and float32 is
    the more exact of the two. Decoding with a cache keeps bf16: it would cast the whole cache at every token.
    """
    return torch.float32 if device_type == "cpu" and dtype == torch.bfloat16 and not cached else dtype


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (K key/value heads shared by H/K query heads each)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        # GPT-2 / nanoGPT: each residual branch adds a random-like term to the stream, so with 2 branches per layer
        # the stream's variance grows with 2 * n_layers; shrinking the output projection keeps it O(1) at init.
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, std=cfg.init_std)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, std=cfg.init_std)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, std=cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, std=resid_std)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # QK-norm (Qwen3's form): each query and key head scaled to unit RMS over D, before RoPE, then times a gain
        # of D shared by all heads. The attention logits are then bounded by the gains instead of growing with the
        # norms of wq and wk, the growth that destabilises training at high learning rates (Wortsman et al. 2023).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q (B, H, T, D), k (B, K, T, D) after QK-norm and RoPE, v (B, K, T, D): what attention
        attends with. Its own method so that llm/core/attention_maps.py computes the weights from the same q, k."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # 2-D, so that each projection is one plain matmul
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if self.q_norm is not None:
            # over D of each head (so the cache holds normed keys); cast back, as a float32 gain under autocast
            # would promote q and k to float32 while attention runs in the compute dtype
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | masks.BlockMask | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C); cos, sin from RotaryEmbedding; cache: this layer's (k, v) buffers.

        mask: None, or additive float / bool (B or 1, 1, T, S), or a flex-attention BlockMask (packed sequences on
        CUDA, see Transformer.hidden). None is causal, and a single new token (T = 1) attends to every slot S (with a
        cache: all those written so far).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)

        if cache is not None:  # write the new keys/values at slots start..start+T-1, attend to all slots so far
            k_cache, v_cache = cache
            k_cache.narrow(2, start, T).copy_(k)
            v_cache.narrow(2, start, T).copy_(v)
            k, v = k_cache.narrow(2, 0, start + T), v_cache.narrow(2, 0, start + T)  # (B, K, S, D)

        gqa = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:  # no copies: SDPA reads each key/value head for its group of query heads
                gqa = {"enable_gqa": True}
            else:  # query head h uses key/value head h // (H / K), as in HF's repeat_kv
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, D)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if masks.BlockMask is not None and isinstance(mask, masks.BlockMask):  # only without dropout (flex has none)
            y = masks.compiled_flex_attention()(q, k, v, block_mask=mask, **gqa)  # (B, H, T, D)
        else:
            dtype, exact = q.dtype, contextlib.nullcontext()
            if attention_dtype(q.device.type, dtype, cached=cache is not None) != dtype:
                # CPU autocast lists SDPA among its bf16 ops: paused, or it would cast the inputs back to bf16
                q, k, v, exact = q.float(), k.float(), v.float(), torch.autocast("cpu", enabled=False)
            with exact:
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=self.dropout if self.training else 0.0,
                    is_causal=mask is None and T > 1,
                    **gqa,
                ).to(dtype)  # (B, H, T, D)
        y = self.wo(y.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim))  # (B*T, C)
        if self.dropout and self.training:
            y = self.resid_dropout(y)
        return y.view(B, T, -1)  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, std=cfg.init_std)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, std=cfg.init_std)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))  # see Attention.wo
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # 2-D: plain matmuls
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B*T, C)
        if self.dropout and self.training:
            y = self.resid_dropout(y)
        return y.view(B, T, -1)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | masks.BlockMask | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Preallocated keys and values of every layer, for generation.

    `k[i]`, `v[i]` have shape (B, n_kv_heads, max_len, head_dim); `length` counts the slots already filled.
    Each `Transformer.forward(tokens, kv_cache=cache)` writes its T tokens at slots length..length+T-1 and then
    advances `length` by T. A slot is a column of the (left-padded) batch, shared by all rows; the rotary position
    of a token is separate and comes from `input_pos`, so a row whose prompt is shorter can start at position 0.

    Usage (left-padded prompts `tokens` (B, T0), `valid` (B, T0) bool, False on padding):

        cache = model.new_kv_cache(batch_size=B, max_len=T0 + n_new)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)              # (B, T0): 0 at each row's first real token
        logits = model(tokens, input_pos=pos, mask=valid, kv_cache=cache)            # prefill
        for _ in range(n_new):
            next_tok = logits[:, -1].argmax(-1, keepdim=True)                         # (B, 1)
            valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)                   # (B, cache.length + 1)
            pos = pos[:, -1:] + 1
            logits = model(next_tok, input_pos=pos, mask=valid, kv_cache=cache)     # one token per step

    Without padding, leave `mask` and `input_pos` out: positions default to the slot numbers. Call `reset()` to
    reuse the buffers for a new batch. Run under `torch.no_grad()` / `torch.inference_mode()`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are kept; stale slots are never attended to)."""
        self.length = 0


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V). See KVCache for generation with caching and left padding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is None: call cfg.with_vocab(tokenizer vocab size) before building")
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, std=cfg.init_std)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, std=cfg.init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_embeddings, the output projection IS the embedding matrix (one Parameter, used twice).

        Moving the whole model (`to`, `to_empty`, ...) re-ties by itself (see _apply); code that materialises
        module by module (`to_empty(recurse=False)` on each) must call this afterwards.
        """
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):
        # `to_empty()` (meta -> real device) makes a new tensor for each module holding the shared weight,
        # which would silently untie it; every device/dtype move goes through _apply, so re-tie here.
        super()._apply(fn, recurse)
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.tie_weights()
        return self

    def init_weights(self) -> None:
        """Re-initialise everything: each module's reset_parameters (the rope tables are recomputed too)."""
        self.tie_weights()
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights()

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache on this model's device and in its dtype."""
        w = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, max_len, device=w.device, dtype=w.dtype)

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C). Arguments as in forward."""
        B, T = tokens.shape
        if segments is not None and (kv_cache is not None or mask is not None):
            raise ValueError("segments (packed sequences) cannot be combined with kv_cache or mask")
        if segments is not None and (segments.shape != (B, T) or segments.is_floating_point()):
            raise ValueError(f"segments must be integer ids ({B}, {T}), got {tuple(segments.shape)} {segments.dtype}")
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KVCache is full: {start} cached + {T} new tokens > max_len={kv_cache.max_len}")
        if mask is not None and (mask.shape[0] != B or mask.shape[1] < start + T or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor ({B}, >= {start + T}), got {tuple(mask.shape)} {mask.dtype}")
        if input_pos is None and start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")

        x = self.tok_embeddings(tokens)  # (B, T, C)
        # The dtype attention computes in (autocast's, else the weights'): the rotary tables and the mask are cast
        # to it once here rather than in every layer.
        device_type = tokens.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if input_pos is None:  # positions start..start+T-1: the cache slots
            cos, sin = self.rope(start=start, length=T, dtype=dtype)  # (T, D)
        else:
            cos, sin = self.rope(input_pos, dtype=dtype)  # (T, D) or (B, 1, T, D)

        # No mask where SDPA needs none, which lets it pick its fastest kernel: training (causal), a prompt without
        # padding filling an empty cache (causal), one new token without padding (it sees every cached slot).
        attn_mask, allowed = None, None
        if segments is not None:  # packed: block-diagonal causal, a BlockMask for flex attention or a dense mask
            dropout_active = self.training and self.cfg.dropout > 0
            if masks.use_flex_attention(tokens.device, T, self.cfg, dropout_active=dropout_active):
                attn_mask = masks.segment_block_mask(segments)
            else:
                allowed = masks.segment_mask(segments)  # (B, 1, T, T) bool
        elif mask is not None or (kv_cache is not None and start > 0 and T > 1):
            allowed = masks.attention_mask(mask, start, T, tokens.device)  # (B or 1, 1, T, S) bool
        if allowed is not None:
            # additive, built once for all layers (SDPA would convert a bool mask in each layer)
            mask_dtype = attention_dtype(device_type, dtype, cached=kv_cache is not None)
            attn_mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=tokens.device).masked_fill_(
                allowed.logical_not(), float("-inf")
            )

        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x = layer(x, cos, sin, attn_mask, cache, start)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.norm(x)  # (B, T, C)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V).

        input_pos: rotary positions of the tokens, (T,) or (B, T); default: 0..T-1 (or the cache slots).
        mask: (B, S) bool, True at valid key slots (False on left padding); S >= cached + T, extra columns ignored.
        kv_cache: a KVCache to read and extend (see its docstring).
        segments: (B, T) integer ids of packed sequences (examples, documents): a token attends only to earlier or
            same positions of its own segment (block-diagonal causal). Give the padding of a row an id of its own.
            Usually with input_pos restarting at 0 in each segment; not with mask or kv_cache.
        With all four None (training) attention is plainly causal.
        """
        hidden = self.hidden(tokens, input_pos=input_pos, mask=mask, kv_cache=kv_cache, segments=segments)
        return self.output(hidden)  # (B, T, V)
