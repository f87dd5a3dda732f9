"""Native LLaDA network (LLaDA-8B-Base / -Instruct, LLaDA-1.5, and the built-in model).

Llama-style: RMSNorm, RoPE, SwiGLU, bidirectional attention. Module names mirror the official
checkpoints (`model.transformer.wte`, `...blocks.N.q_proj`, `...ff_out`) so their safetensors load by
name with no conversion step, and so do checkpoints written by `unmask train`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from unmask.errors import UnmaskError
from unmask.models.layers import RMSNorm, SelfAttention, rope_cos_sin


# Settings of LLaDA's config.json (its configuration_llada.py) that change the forward pass, with the one
# value the native network implements and what another value would do. A key that is absent counts as
# the implemented value; unmask's own checkpoints write every one of them. Loading a checkpoint with another
# value would give logits that differ from the checkpoint's own code, so the loader refuses it instead.
# Keys that do not change inference (dropouts, flash_attention, init_*, precision, rope_full_precision,
# which only sets RoPE's precision) are accepted at any value; so is attention_layer_norm_with_affine,
# which matters only when attention_layer_norm is on.
UNIMPLEMENTED = {
    "block_type": ("llama", "another transformer block layout"),
    "activation_type": ("silu", "another MLP activation"),
    "layer_norm_type": ("rms", "another normalisation than RMSNorm"),
    "layer_norm_with_affine": (True, "norms without a learned scale"),
    "bias_for_layer_norm": (False, "biases in the norms"),
    "include_bias": (False, "biases in every linear layer"),
    "attention_layer_norm": (False, "q/k norms (q_norm, k_norm) in attention"),
    "input_emb_norm": (False, "embeddings scaled by sqrt(d_model)"),
    "scale_logits": (False, "logits scaled by 1/sqrt(d_model)"),
    "rope": (True, "no rotary embeddings (a learned position table instead)"),
    "alibi": (False, "ALiBi attention biases"),
    "block_group_size": (1, "blocks stored under block_groups.N"),
    # not keys of LLaDA's own config, but of its relatives (OLMo, Llama): refused rather than ignored
    "clip_qkv": (None, "q/k/v clipped to a range"),
    "rope_scaling": (None, "scaled rotary embeddings"),
}
NULL_MEANS_DEFAULT = ("bias_for_layer_norm",)  # null inherits include_bias, itself required to be false


def _json(value) -> str:
    return json.dumps(value)


def _refuse_unimplemented(raw: dict, source: str) -> None:
    for key, (supported, effect) in UNIMPLEMENTED.items():
        if key not in raw:
            continue
        value = raw[key]
        if value == supported or (value is None and key in NULL_MEANS_DEFAULT):
            continue
        if key == "rope_scaling" and isinstance(value, dict) and (value.get("rope_type") or value.get("type")) == "default":
            continue
        raise UnmaskError(
            f"{source}: {key}={_json(value)} ({effect}) is not implemented by the native LLaDA network, "
            f"which supports only {key}={_json(supported)}; refusing rather than computing wrong logits"
        )


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
    # unmask's own key: block-causal attention (a block-diffusion model, `unmask train sft
    # --block-diffusion`): a position sees its own block and the earlier ones, blocks of the decode's
    # block length anchored at position 0. LLaDA's own checkpoints are bidirectional (false).
    block_causal: bool = False

    REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LLaDAConfig":
        missing = [key for key in cls.REQUIRED if key not in raw]
        if missing:
            raise UnmaskError(f"{source} lacks the LLaDA key(s) {', '.join(missing)}; is this a LLaDA checkpoint?")
        _refuse_unimplemented(raw, source)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if raw.get("mlp_hidden_size") is None:
            values["mlp_hidden_size"] = int(raw.get("mlp_ratio", 4)) * int(raw["d_model"])
        if values.get("mask_token_id") is None:
            values.pop("mask_token_id", None)
        mqa = raw.get("multi_query_attention")
        if mqa is not None:  # LLaDA's older switch for one KV head; n_kv_heads, when set, must agree with it
            implied = 1 if mqa else int(raw["n_heads"])
            if raw.get("n_kv_heads") is None:
                values["n_kv_heads"] = implied
            elif raw["n_kv_heads"] != implied:
                raise UnmaskError(
                    f"{source}: multi_query_attention={_json(mqa)} implies n_kv_heads={implied} but n_kv_heads is {raw['n_kv_heads']}; drop one of the two"
                )
        cfg = cls(**values)
        if cfg.d_model % cfg.n_heads:
            raise UnmaskError(f"{source}: d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        if cfg.n_heads % cfg.kv_heads:
            raise UnmaskError(f"{source}: n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.kv_heads}")
        if cfg.embedding_size is not None and cfg.embedding_size < cfg.vocab_size:
            raise UnmaskError(f"{source}: embedding_size {cfg.embedding_size} is smaller than vocab_size {cfg.vocab_size}")
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
        if not self.block_causal:
            del out["block_causal"]  # a bidirectional checkpoint holds LLaDA's own keys only
        out.update(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            block_type="llama",
            layer_norm_type="rms",
            layer_norm_with_affine=True,
            bias_for_layer_norm=False,
            attention_layer_norm=False,
            block_group_size=1,
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

    def forward(self, x, rope, key_mask, cache=None, positions=None, attn_block=None, pair_mask=None):
        h = self.attn_norm(x)
        att = self.attn(self.q_proj(h), self.k_proj(h), self.v_proj(h), rope, key_mask, cache, self.layer_idx,
                        positions=positions, attn_block=attn_block, pair_mask=pair_mask)
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

    @property
    def block_causal(self) -> bool:
        return bool(self.config.block_causal)

    def body(self, input_ids, position_ids, key_mask=None, cache=None, keep=None, attn_block=None, pair_mask=None):
        """Final (normed) hidden states (batch, seq, d_model), or only at `keep` (batch, q).
        `attn_block`: the block length of a block-causal network's attention (ignored by a
        bidirectional one); `pair_mask` (batch, seq, seq): which keys each query may see, besides
        `key_mask` (training's two-copy canvases)."""
        t = self.model.transformer
        x = t.wte(input_ids)
        cfg = self.config
        rope = rope_cos_sin(position_ids, cfg.d_model // cfg.n_heads, cfg.rope_theta, x.dtype)
        attn_block = attn_block if cfg.block_causal else None
        for block in t.blocks:
            x = block(x, rope, key_mask, cache, position_ids, attn_block, pair_mask)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return t.ln_f(x)

    def head(self, hidden):
        """Logits (..., rows) of hidden states from `body`."""
        t = self.model.transformer
        if self.config.weight_tying:
            return F.linear(hidden, t.wte.weight)
        return t.ff_out(hidden)

    def forward(self, input_ids, position_ids, key_mask=None, cache=None, keep=None, project=True, attn_block=None,
                pair_mask=None):
        """Logits, or with `project=False` the hidden states `head` projects (`body`, only at `keep`)."""
        hidden = self.body(input_ids, position_ids, key_mask, cache, keep, attn_block, pair_mask)
        return self.head(hidden) if project else hidden

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
