"""Native LLaDA network (LLaDA-8B-Base / -Instruct, LLaDA-1.5, and the built-in model).

Llama-style: RMSNorm, RoPE, SwiGLU, bidirectional attention. Module names mirror the official
checkpoints (`model.transformer.wte`, `...blocks.N.q_proj`, `...ff_out`) so their safetensors load by
name with no conversion step, and so do checkpoints written by `unmask train`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from unmask.errors import UnmaskError
from unmask.models.layers import RMSNorm, SelfAttention, rope_cos_sin


@dataclass
class LLaDAConfig:
    """The keys of LLaDA's config.json that shape the network (others are kept but unused)."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LLaDAConfig":
        missing = [key for key in cls.REQUIRED if key not in raw]
        if missing:
            raise UnmaskError(f"{source} lacks the LLaDA key(s) {', '.join(missing)}; is this a LLaDA checkpoint?")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("mlp_hidden_size") is None:
            values["mlp_hidden_size"] = int(raw.get("mlp_ratio", 4)) * int(raw["d_model"])
        if values.get("mask_token_id") is None:
            values.pop("mask_token_id", None)
        cfg = cls(**values)
        if cfg.d_model % cfg.n_heads:
            raise UnmaskError(f"{source}: d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if cfg.include_bias:
            raise UnmaskError(f"{source}: include_bias=true is not a LLaDA layout unmask supports")
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rows(self) -> int:
        """Rows of the embedding and output matrices (LLaDA pads the vocabulary)."""
        return self.embedding_size or self.vocab_size

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            block_type="llama",
            layer_norm_type="rms",
            activation_type="silu",
            rope=True,
            alibi=False,
            scale_logits=False,
            input_emb_norm=False,
            mlp_ratio=max(1, self.mlp_hidden_size // self.d_model),
        )
        return out


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig, layer_idx: int):
        super().__init__()
        head_dim = cfg.d_model // cfg.n_heads
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.include_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * head_dim, bias=cfg.include_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * head_dim, bias=cfg.include_qkv_bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)  # gate (SiLU)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)
        self.attn = SelfAttention(cfg.n_heads, cfg.kv_heads, head_dim)

    def forward(self, x, rope, key_mask, cache=None):
        h = self.attn_norm(x)
        att = self.attn(self.q_proj(h), self.k_proj(h), self.v_proj(h), rope, key_mask, cache, self.layer_idx)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDANetwork(nn.Module):
    """input ids -> logits (batch, seq, rows); parameter names match LLaDA's safetensors."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.rows
        transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.rows, cfg.d_model),
                blocks=nn.ModuleList(LLaDABlock(cfg, i) for i in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.rows, bias=False)
        self.model = nn.Module()
        self.model.transformer = transformer

    def forward(self, input_ids, position_ids, key_mask=None, cache=None):
        t = self.model.transformer
        x = t.wte(input_ids)
        cfg = self.config
        rope = rope_cos_sin(position_ids, cfg.d_model // cfg.n_heads, cfg.rope_theta, x.dtype)
        for block in t.blocks:
            x = block(x, rope, key_mask, cache)
        x = t.ln_f(x)
        if self.config.weight_tying:
            return F.linear(x, t.wte.weight)
        return t.ff_out(x)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch and for test checkpoints."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        depth_scale = (2 * self.config.n_layers) ** -0.5
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
                scale = depth_scale if residual_out else 1.0
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=gen) * std * scale)
