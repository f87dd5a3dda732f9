"""Native Dream-v0 network (Dream-v0-Base-7B / -Instruct-7B and checkpoints of the same layout).

Dream was adapted from Qwen2.5: RMSNorm, RoPE, SwiGLU, grouped KV heads, biases on q/k/v only, with
causal attention replaced by bidirectional attention. Module names mirror the official checkpoints
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `lm_head`) so their safetensors load by
name with no conversion step and without the checkpoint's remote code.

Dream keeps its autoregressive ancestry in one place: the logits at position i predict token i+1.
The network returns those raw logits; the architecture registers `shifted=True`, so
`DiffusionLM.logits` moves them to the position they predict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from unmask.errors import UnmaskError
from unmask.models.layers import RMSNorm, SelfAttention, rope_cos_sin
from unmask.models.loading import Architecture, register_architecture


@dataclass
class DreamConfig:
    """The keys of Dream's config.json that shape the network (others are kept by the file, unused).

    Sizes default to Dream-v0-7B's. Token ids default to None: when the config lacks one, the
    loader takes it from the tokenizer instead of guessing Dream-7B's ids for another vocabulary.
    """

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "DreamConfig":
        missing = [key for key in cls.REQUIRED if raw.get(key) is None]
        if missing:
            raise UnmaskError(f"{source} lacks the Dream key(s) {', '.join(missing)}; is this a Dream checkpoint?")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        values.setdefault("num_key_value_heads", raw["num_attention_heads"])  # absent means one KV head per head
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise UnmaskError(
                f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
            )
        if cfg.num_attention_heads % cfg.kv_heads:
            raise UnmaskError(
                f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple of num_key_value_heads {cfg.kv_heads}"
            )
        if raw.get("head_dim") not in (None, cfg.head_dim):
            raise UnmaskError(f"{source}: head_dim {raw['head_dim']} differs from hidden_size / num_attention_heads, which unmask does not support")
        # these would change the forward pass; refusing beats decoding with silently wrong logits
        scaling = raw.get("rope_scaling")
        kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise UnmaskError(f"{source}: rope_scaling {scaling} is not supported by the native Dream network; remove it or use the original code")
        if raw.get("use_sliding_window"):
            raise UnmaskError(f"{source}: use_sliding_window=true is not supported by the native Dream network; set it to false")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnmaskError(f"{source}: hidden_act {raw['hidden_act']!r} is not a Dream layout unmask supports (it needs silu)")
        return cfg

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        out = asdict(self)
        out["num_key_value_heads"] = self.kv_heads
        out.update(
            model_type="Dream",
            architectures=["DreamModel"],
            hidden_act="silu",
            attention_dropout=0.0,
            use_sliding_window=False,
            sliding_window=None,
            use_cache=False,
        )
        return out


class DreamAttention(nn.Module):
    """Qwen2 attention projections (biased q/k/v, unbiased output) around the shared RoPE attention."""

    def __init__(self, cfg: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.attn = SelfAttention(cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim)

    def forward(self, x, rope, key_mask, cache=None):
        out = self.attn(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, key_mask, cache, self.layer_idx)
        return self.o_proj(out)


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamBlock(nn.Module):
    def __init__(self, cfg: DreamConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x, rope, key_mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, key_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamNetwork(nn.Module):
    """input ids -> raw (still shifted) logits (batch, seq, vocab_size); names match Dream's safetensors."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DreamBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def body(self, input_ids, position_ids, key_mask=None, cache=None, keep=None):
        """Final (normed) hidden states (batch, seq, hidden), or only at `keep` (batch, q)."""
        x = self.model.embed_tokens(input_ids)
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, key_mask, cache)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.model.norm(x)

    def head(self, hidden):
        """Raw (still shifted) logits (..., vocab_size) of hidden states from `body`."""
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids, position_ids, key_mask=None, cache=None, keep=None, project=True):
        """Logits, or with `project=False` the hidden states `head` projects (`body`, only at `keep`)."""
        hidden = self.body(input_ids, position_ids, key_mask, cache, keep)
        return self.head(hidden) if project else hidden

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch and for test checkpoints.

        q/k/v biases get random values too (not zeros) so that tests exercise the bias path.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        depth_scale = (2 * self.config.num_hidden_layers) ** -0.5
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                scale = depth_scale if residual_out else 1.0
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=gen) * std * scale)


def _is_dream(raw: dict) -> bool:
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return str(raw.get("model_type", "")).lower() == "dream" or any("dream" in a for a in archs)


def _special_ids(cfg: DreamConfig, raw: dict, tokenizer) -> dict:
    hf = tokenizer.hf
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else hf.eos_token_id
    stop = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if not stop:
        raise UnmaskError("the Dream checkpoint declares no eos_token_id in config.json and its tokenizer has no EOS token; add eos_token_id to config.json")
    im_end = tokenizer.token_id("<|im_end|>")  # Dream-Instruct's ChatML ends a turn with it
    if im_end is not None and im_end not in stop:
        stop.append(im_end)
    mask = cfg.mask_token_id
    if mask is None:
        mask = tokenizer.token_id("<|mask|>")
    if mask is None:
        mask = hf.mask_token_id
    if mask is None:
        raise UnmaskError("the Dream checkpoint declares no mask token (no mask_token_id in config.json, no <|mask|> in its tokenizer); add mask_token_id to config.json")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else stop[0]
    return dict(
        mask_id=int(mask),
        eos_id=int(stop[0]),
        stop_ids=tuple(int(s) for s in stop),
        pad_id=int(pad),
        max_length=int(cfg.max_position_embeddings),
    )


DREAM = register_architecture(
    Architecture(
        name="dream",
        config_from_dict=DreamConfig.from_dict,
        network=DreamNetwork,
        shifted=True,
        matches=_is_dream,
        special_ids=_special_ids,
    )
)
