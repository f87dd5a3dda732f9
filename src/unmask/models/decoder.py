"""The Qwen-style decoder most dLLMs share: Dream, Fast-dLLM v2, SDAR (dense and MoE) and LLaDA-MoE.

One network, its differences named in a `Layout`: biases on q/k/v (Qwen2) or none (Qwen3), per-head
q/k norms (Qwen3, LLaDA-MoE), an explicit head width (Qwen3: heads x head_dim need not equal the
model width), partial rotary, a clip of q/k/v, dense or sparse MLPs per layer (`unmask.models.moe`),
a shared expert on the layer (LLaDA-MoE), tied embeddings, and the attention: bidirectional (Dream,
LLaDA-MoE) or block-causal (SDAR, Fast-dLLM v2: a query attends to its own block and earlier ones,
blocks anchored at position 0, of the decode's block length). Module names are the checkpoints'
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `...mlp.experts.E.gate_proj`, `lm_head`),
so their safetensors load by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unmask.models.layers import RMSNorm, SelfAttention, rope_cos_sin
from unmask.models.moe import RouterConfig, SparseMoE, SwiGLU


@dataclass
class LayerMLP:
    """One layer's feed-forward: dense (`router` None) or sparse, and the layer's shared expert."""

    inter: int  # the dense width, or each routed expert's
    router: RouterConfig | None = None
    shared: int = 0  # width of a shared expert added on the layer (LLaDA-MoE), 0 for none


@dataclass
class Layout:
    """What a Qwen-style checkpoint's config says about the forward pass."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    mlps: list[LayerMLP] = field(default_factory=list)  # one per layer
    rotary_dim: int | None = None  # partial rotary: the first dims of each head (None: all)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    block_causal: bool = False
    norm_weight_in_float32: bool = False  # SDAR's norm multiplies by its weight before casting back


class DecoderAttention(nn.Module):
    def __init__(self, lay: Layout, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        inner, kv = lay.num_heads * lay.head_dim, lay.num_kv_heads * lay.head_dim
        self.q_proj = nn.Linear(lay.hidden_size, inner, bias=lay.qkv_bias)
        self.k_proj = nn.Linear(lay.hidden_size, kv, bias=lay.qkv_bias)
        self.v_proj = nn.Linear(lay.hidden_size, kv, bias=lay.qkv_bias)
        self.o_proj = nn.Linear(inner, lay.hidden_size, bias=lay.o_bias)
        if lay.qk_norm:
            self.q_norm = RMSNorm(lay.head_dim, lay.rms_norm_eps, lay.norm_weight_in_float32)
            self.k_norm = RMSNorm(lay.head_dim, lay.rms_norm_eps, lay.norm_weight_in_float32)
        self.attn = SelfAttention(lay.num_heads, lay.num_kv_heads, lay.head_dim, clip=lay.clip_qkv)

    def forward(self, x, rope, key_mask, cache=None, positions=None, attn_block=None):
        out = self.attn(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, key_mask, cache, self.layer_idx,
                        positions=positions, attn_block=attn_block, q_norm=getattr(self, "q_norm", None),
                        k_norm=getattr(self, "k_norm", None))
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, lay: Layout, layer_idx: int):
        super().__init__()
        spec = lay.mlps[layer_idx]
        self.input_layernorm = RMSNorm(lay.hidden_size, lay.rms_norm_eps, lay.norm_weight_in_float32)
        self.self_attn = DecoderAttention(lay, layer_idx)
        self.post_attention_layernorm = RMSNorm(lay.hidden_size, lay.rms_norm_eps, lay.norm_weight_in_float32)
        if spec.router is None:
            self.mlp = SwiGLU(lay.hidden_size, spec.inter)
        else:
            self.mlp = SparseMoE(lay.hidden_size, spec.inter, spec.router)
        if spec.shared:
            self.shared_expert = SwiGLU(lay.hidden_size, spec.shared)

    def forward(self, x, rope, key_mask, cache=None, positions=None, attn_block=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_mask, cache, positions, attn_block)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class StackedNetwork(nn.Module):
    """Embeddings, layers and a final norm under `model`, and `lm_head` unless the embeddings are
    tied: the body / head split the decode loop uses. A subclass builds them and sets `embed_name`,
    `rotary_dim`, `rope_theta`, `tied` and `block_causal`."""

    embed_name = "embed_tokens"

    def body(self, input_ids, position_ids, key_mask=None, cache=None, keep=None, attn_block=None):
        """Final (normed) hidden states (batch, seq, hidden), or only at `keep` (batch, q).
        `attn_block`: the block length of block-causal attention (ignored by a bidirectional network)."""
        x = getattr(self.model, self.embed_name)(input_ids)
        rope = rope_cos_sin(position_ids, self.rotary_dim, self.rope_theta, x.dtype)
        attn_block = attn_block if self.block_causal else None
        for layer in self.model.layers:
            x = layer(x, rope, key_mask, cache, position_ids, attn_block)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.model.norm(x)

    def head(self, hidden):
        """Logits (..., vocab) of hidden states from `body`."""
        if self.tied:
            return F.linear(hidden, getattr(self.model, self.embed_name).weight)
        return self.lm_head(hidden)

    def forward(self, input_ids, position_ids, key_mask=None, cache=None, keep=None, project=True, attn_block=None):
        """Logits, or with `project=False` the hidden states `head` projects (`body`, only at `keep`)."""
        hidden = self.body(input_ids, position_ids, key_mask, cache, keep, attn_block)
        return self.head(hidden) if project else hidden

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        random_init(self, std, seed)


class DecoderNetwork(StackedNetwork):
    """input ids -> logits (batch, seq, vocab); parameter names match the Qwen-style checkpoints."""

    def __init__(self, lay: Layout):
        super().__init__()
        self.layout = lay
        self.vocab_size = lay.vocab_size
        self.block_causal = lay.block_causal
        self.rotary_dim, self.rope_theta = lay.rotary_dim or lay.head_dim, lay.rope_theta
        self.tied = lay.tie_word_embeddings
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(lay.vocab_size, lay.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(lay, i) for i in range(lay.num_layers))
        self.model.norm = RMSNorm(lay.hidden_size, lay.rms_norm_eps, lay.norm_weight_in_float32)
        if not lay.tie_word_embeddings:
            self.lm_head = nn.Linear(lay.hidden_size, lay.vocab_size, bias=False)


def check_common(raw: dict, source: str, family: str) -> None:
    """Refuse, in one line, config values that change the forward pass and that the native network
    does not implement (rather than compute logits that differ from the checkpoint's own code)."""
    from unmask.errors import UnmaskError

    if raw.get("hidden_act", "silu") != "silu":
        raise UnmaskError(f"{source}: hidden_act {raw['hidden_act']!r} is not implemented by the native {family} "
                          "network (it needs silu)")
    scaling = raw.get("rope_scaling")
    kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind not in (None, "default"):
        raise UnmaskError(f"{source}: rope_scaling {scaling} is not implemented by the native {family} network; "
                          "remove it or use the checkpoint's own code")
    if raw.get("use_sliding_window"):
        raise UnmaskError(f"{source}: use_sliding_window=true is not implemented by the native {family} network")


def stop_ids_with(eos, tokenizer, *turn_ends: str, source: str) -> tuple[int, ...]:
    """The stop ids: the config's EOS (an id or a list) and those of `turn_ends` the tokenizer has."""
    from unmask.errors import UnmaskError

    stop = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    for token in turn_ends:
        tid = tokenizer.token_id(token)
        if tid is not None and tid not in stop:
            stop.append(int(tid))
    if not stop:
        raise UnmaskError(f"the {source} checkpoint declares no eos_token_id and its tokenizer has none of "
                          f"{', '.join(turn_ends)}; add eos_token_id to config.json")
    return tuple(stop)


def family_ids(tokenizer, *, mask_id, mask_token: str, default_mask: int, eos, turn_ends: tuple[str, ...], pad_id,
               max_length: int, source: str, pad_last: bool = False) -> dict:
    """A family's special ids for `DiffusionLM`: the mask id (config.json's, else the tokenizer's
    `mask_token`, else the family's `default_mask`), the stop ids (config.json's EOS and those of
    `turn_ends` the tokenizer has), the pad id (config.json's, else the first stop id, or the last
    with `pad_last`) and the context."""
    mask = mask_id if mask_id is not None else tokenizer.token_id(mask_token)
    mask = default_mask if mask is None else mask
    stop = stop_ids_with(eos, tokenizer, *turn_ends, source=source)
    pad = pad_id if pad_id is not None else stop[-1 if pad_last else 0]
    return dict(mask_id=int(mask), eos_id=int(stop[0]), stop_ids=stop, pad_id=int(pad), max_length=int(max_length))


def random_init(network: nn.Module, std: float, seed: int | None) -> None:
    """Random weights for tests and tiny checkpoints: norms near 1, everything else N(0, std)
    (biases and expert biases included, so that tests exercise them)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
