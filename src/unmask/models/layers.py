"""Building blocks shared by the native networks: RMSNorm, rotary embeddings, attention.

Written in the plain style of gpt-fast's model.py. Attention is bidirectional; `key_mask` hides
padding keys so that a left-padded row computes what it computes alone. Block-causal models (block
diffusion: LLaDA2.x, SDAR, Fast-dLLM v2) pass each position's block index (its position id // the
block length, blocks anchored at position 0): a query then attends to keys of its own block and of
earlier ones only. The optional `cache` argument is where the KV cache plugs in (see
`unmask.models.cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as LLaDA and Qwen2 do: normalised, cast back, then
    scaled; with `weight_in_float32`, scaled in float32 and cast once (SDAR's fused kernel)."""

    def __init__(self, dim: int, eps: float = 1e-5, weight_in_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.weight_in_float32 = weight_in_float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (self.weight.float() * x32).to(dtype)
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape (batch, 1, seq, head_dim) for the given positions (computed in float32).

    `head_dim` is the rotated width: a partial rotary model passes its rotary dims, and `apply_rope`
    then rotates the first that many dims of each head and passes the rest through."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (batch, seq, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned = x[..., :rotary]  # partial rotary: the first dims turn, the rest pass through
    return torch.cat([turned * cos + _rotate_half(turned) * sin, x[..., rotary:]], dim=-1)


def attention(
    q: torch.Tensor,  # (batch, heads, q_len, head_dim)
    k: torch.Tensor,  # (batch, kv_heads, k_len, head_dim)
    v: torch.Tensor,
    key_mask: torch.Tensor | None,  # (batch, k_len) bool, True where a key may be attended
    q_blocks: torch.Tensor | None = None,  # (batch, q_len) block of each query (block-causal models)
    k_blocks: torch.Tensor | None = None,  # (batch, k_len) block of each key
    pair_mask: torch.Tensor | None = None,  # (batch, q_len, k_len) bool: which keys each query may see
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads and key padding: bidirectional, or
    block-causal when block indices are given (a query sees keys of its block and earlier ones),
    or as `pair_mask` says (with the key padding)."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    attn_mask = None
    if key_mask is not None and not bool(key_mask.all()):
        attn_mask = key_mask[:, None, None, :]
    if q_blocks is not None:
        causal = (k_blocks[:, None, None, :] <= q_blocks[:, None, :, None])  # (batch, 1, q, k)
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if pair_mask is not None:
        attn_mask = pair_mask[:, None] if attn_mask is None else attn_mask & pair_mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE; projection names are given by the caller's layout.

    Optional per-head q/k norms (applied over each head's dims before RoPE, as Qwen3, LLaDA-MoE and
    LLaDA2 do; the caller owns them, under its checkpoint's names) and a clip of q, k and v to
    [-clip, clip] after them (OLMo's clip_qkv)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, clip: float | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.clip = clip

    def forward(self, q, k, v, rope, key_mask, cache=None, layer_idx: int = 0, positions=None, attn_block=None,
                q_norm=None, k_norm=None, pair_mask=None):
        """`rope`: the (cos, sin) pair of `rope_cos_sin`, computed once per network call for all layers.
        Block-causal attention: `attn_block` the block length, `positions` the queries' position ids
        (batch, seq); a position's block is its position id // the block length."""
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_positions = positions
        if cache is not None:
            # the cache merges these keys/values with the stored ones and says which keys are live
            k, v, key_mask = cache.update(layer_idx, k, v, key_mask)
            if attn_block:
                key_positions = cache.key_positions(positions)
        blocks = key_blocks = None
        if attn_block:
            blocks, key_blocks = positions // attn_block, key_positions // attn_block
        out = attention(q, k, v, key_mask, blocks, key_blocks, pair_mask)
        return out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
