"""Gemma decoder blocks as Pi0 / Pi0.5 use them (PaliGemma's Gemma 2B and the action expert).

Reference semantics: openpi `models/gemma.py` (JAX, the trained model) and
`models_pytorch/gemma_pytorch.py`; LeRobot `pi_gemma.py`. What differs from stock Gemma:
- The decoder applies no input normalizer: `embed()` scales token embeddings by
  sqrt(width) (the factor cast to the compute dtype first), image features are fed unscaled.
- RMSNorm is `x * rsqrt(mean(x^2) + 1e-6) * (1 + w)` computed in fp32; the action expert
  of Pi0.5 replaces it with adaRMS: `(scale, shift, gate) = dense(cond)`,
  `y = rms(x) * (1 + scale) + shift`, and the residual after the block is `x + f(y) * gate`.
- RoPE (theta 1e4, split halves over the full head_dim) is computed in fp32, q is scaled by
  head_dim^-0.5 after it. A masked logit gets -2.3819763e38 (not -inf), so the softmax of a
  fully masked row (padding, a missing camera) stays finite, as in the reference; attention
  itself is torch's SDPA with that additive bias (fp32 softmax accumulation).
Parameter names follow transformers' GemmaModel (`layers.{i}.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PALIGEMMA_VOCAB_SIZE = 257_152
MASKED_LOGIT = -2.3819763e38  # big_vision / gemma's "big_neg"


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = PALIGEMMA_VOCAB_SIZE  # only the VLM has an embedding table
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0


# openpi `gemma.get_config`; the *_lora variants have the dims of their base.
GEMMA_VARIANTS = {
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}
GEMMA_VARIANTS["gemma_300m_lora"] = GEMMA_VARIANTS["gemma_300m"]
GEMMA_VARIANTS["gemma_2b_lora"] = GEMMA_VARIANTS["gemma_2b"]


def gemma_variant(name: str) -> GemmaConfig:
    try:
        return GEMMA_VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown Gemma variant {name!r}; known: {sorted(GEMMA_VARIANTS)}") from None


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Gemma RMSNorm, (1 + w) form. forward returns (y, gate=None) like AdaRMSNorm."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return (_rms(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """adaRMS of the Pi0.5 action expert: no learned scale, modulation from `cond`."""

    def __init__(self, width: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        modulation = self.dense(cond.to(self.dense.weight.dtype))[:, None, :]  # [B, 1, 3*width]
        scale, shift, gate = modulation.float().chunk(3, dim=-1)
        y = _rms(x, self.eps) * (1.0 + scale) + shift
        return y.to(x.dtype), gate.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10_000.0):
    """cos, sin [B, 1, T, head_dim/2] (fp32) for integer positions [B, T]."""
    freq_exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    radians = positions[..., None].float() / (theta**freq_exponents)
    return torch.cos(radians)[:, None], torch.sin(radians)[:, None]


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x [B, heads, T, D]: rotate the two halves of D (not interleaved pairs), in fp32."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask [B, T, S] -> additive logit bias [B, 1, T, S]: 0 where allowed, MASKED_LOGIT elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, MASKED_LOGIT)[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D] (already scaled), k/v [B, KV, S, D], bias [B, 1, T, S] -> [B, T, H*D].

    Query head n reads kv head n // (H / KV) (grouped-query attention)."""
    b, h, t, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, t, h * d)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def project(self, x: torch.Tensor, rope):
        """q (scaled), k [B, heads, T, D] with RoPE applied, and v."""
        b, t, _ = x.shape

        def heads(y, n):
            return y.view(b, t, n, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x), self.num_heads), rope) * self.head_dim**-0.5
        k = apply_rope(heads(self.k_proj(x), self.num_kv_heads), rope)
        return q, k, heads(self.v_proj(x), self.num_kv_heads)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def _norm(cfg: GemmaConfig, cond_dim: int | None) -> nn.Module:
    if cond_dim is None:
        return RMSNorm(cfg.width, cfg.rms_norm_eps)
    return AdaRMSNorm(cfg.width, cond_dim, cfg.rms_norm_eps)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = _norm(cfg, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = _norm(cfg, cond_dim)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, rope, bias, kv_prefix=None, cond=None):
        """x [B, T, width]; bias [B, 1, T, S] (attention_bias) over keys = (kv_prefix tokens, then these T).

        Returns the new x and this layer's own (k, v), which is what a prefix pass caches."""
        h, gate = self.input_layernorm(x, cond)
        q, k, v = self.self_attn.project(h, rope)
        keys, values = (k, v) if kv_prefix is None else (torch.cat([kv_prefix[0], k], 2), torch.cat([kv_prefix[1], v], 2))
        x = gated_residual(x, self.self_attn.o_proj(attention(q, keys, values, bias)), gate)
        h, gate = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate), (k, v)


class GemmaDecoder(nn.Module):
    """A stack of decoder layers + final norm; with `embed_tokens` when it reads tokens (the VLM).

    cond_dim set -> every norm is adaRMS conditioned on `cond` [B, cond_dim] (Pi0.5 expert)."""

    def __init__(self, cfg: GemmaConfig, *, with_embedding: bool, cond_dim: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width) if with_embedding else None
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = _norm(cfg, cond_dim)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens.weight
        return table[tokens] * torch.tensor(math.sqrt(self.config.width), dtype=table.dtype)

    def forward(self, x, rope, mask, kv_prefix=None, cond=None):
        """x [B, T, width], mask bool [B, T, S] -> (final-normed hidden [B, T, width],
        per-layer (k, v) of these tokens)."""
        bias, kv_cache = attention_bias(mask, x.dtype), []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, bias, None if kv_prefix is None else kv_prefix[i], cond)
            kv_cache.append(kv)
        return self.norm(x, cond)[0], kv_cache
