"""Building blocks shared by the native networks: RMSNorm, rotary embeddings, attention.

Written in the plain style of gpt-fast's model.py. Attention is bidirectional; `key_mask` hides
padding keys so that a left-padded row computes what it computes alone. The optional `cache`
argument is where the KV cache plugs in (see `unmask.models.cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as LLaDA and Qwen2 do."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape (batch, 1, seq, head_dim) for the given positions (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (batch, seq, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def attention(
    q: torch.Tensor,  # (batch, heads, q_len, head_dim)
    k: torch.Tensor,  # (batch, kv_heads, k_len, head_dim)
    v: torch.Tensor,
    key_mask: torch.Tensor | None,  # (batch, k_len) bool, True where a key may be attended
) -> torch.Tensor:
    """Bidirectional scaled dot-product attention with grouped KV heads and key padding."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    attn_mask = None
    if key_mask is not None and not bool(key_mask.all()):
        attn_mask = key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE; projection names are given by the caller's layout."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim

    def forward(self, q, k, v, rope, key_mask, cache=None, layer_idx: int = 0):
        """`rope`: the (cos, sin) pair of `rope_cos_sin`, computed once per network call for all layers."""
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # the cache merges these keys/values with the stored ones and says which keys are live
            k, v, key_mask = cache.update(layer_idx, k, v, key_mask)
        out = attention(q, k, v, key_mask)
        return out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
