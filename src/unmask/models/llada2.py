"""Native LLaDA2.0 and LLaDA2.1 (inclusionAI's LLaDA2.x-mini / -flash): block-diffusion mixtures of experts.

Loaded by the checkpoints' own names (Ling 2.0's layout: `model.word_embeddings`, a fused
`attention.query_key_value` split head-major into query, key and value heads, per-head
`query_layernorm` / `key_layernorm` before RoPE, `attention.dense`, `mlp.gate` with its
`expert_bias`, `mlp.experts.E.*`, `mlp.shared_experts`) and config keys. Rotary embeddings turn the
first `partial_rotary_factor` of each head's dims. The first `first_k_dense_replace` layers are
dense. The router is DeepSeek-V3's: float32 logits, sigmoid scores, the expert bias added for the
choice only, `n_group` groups of experts scored by their two best biased scores with the best
`topk_group` eligible, top-k, the chosen unbiased scores renormalised and scaled by
`routed_scaling_factor`. Keys the reference code reads but hard-codes (`score_function`,
`router_dtype`, `norm_topk_prob`, `moe_router_enable_expert_bias`, `rotary_dim`) are ignored here
too. 2.0 and 2.1 share the network; they differ in their decoders (`llada2`, `llada21`).

Attention is block-causal in blocks of the decode's block length (32) anchored at position 0. The
reference decoders use no cache (each call recomputes the prefix up to the block's end); unmask's
exact cache computes the finished block again with the next one at no extra call. They stop after
a finished block that holds EOS: `BlockDiffusion(store_calls=False, stop_rule="block")`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unmask.errors import UnmaskError
from unmask.models.base import BlockDiffusion
from unmask.models.decoder import StackedNetwork, check_common, family_ids
from unmask.models.layers import RMSNorm, SelfAttention
from unmask.models.loading import Architecture, register_architecture
from unmask.models.moe import RouterConfig, SparseMoE, SwiGLU

MASK_TOKEN = "<|mask|>"
END_OF_TURN = "<|role_end|>"
DEFAULT_MASK_ID = 156895
LLADA2_BLOCKS = BlockDiffusion(store_calls=False, bonus=False, stop_rule="block")


@dataclass
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float
    intermediate_size: int
    first_k_dense_replace: int
    moe_intermediate_size: int
    num_shared_experts: int
    router: RouterConfig | None
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = False
    tie_word_embeddings: bool = False
    mask_token_id: int | None = None
    eos_token_id: int | None = 156892
    pad_token_id: int | None = None
    max_position_embeddings: int = 32768
    version: str = "2.0"

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LLaDA2Config":
        missing = [k for k in cls.REQUIRED if raw.get(k) is None]
        if missing:
            raise UnmaskError(f"{source} lacks the LLaDA2 key(s) {', '.join(missing)}; is this a LLaDA2 checkpoint?")
        check_common(raw, source, "LLaDA2")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        kv = int(raw.get("num_key_value_heads") or heads)
        if heads % kv:
            raise UnmaskError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rotary = int(head_dim * float(raw.get("partial_rotary_factor", 1.0)))
        if rotary <= 0 or rotary > head_dim or rotary % 2:
            raise UnmaskError(f"{source}: partial_rotary_factor {raw.get('partial_rotary_factor')} gives {rotary} rotary "
                              f"dims of {head_dim}; it needs an even number between 2 and {head_dim}")
        router = None
        if raw.get("num_experts") is not None:
            needed = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if raw.get(k) is None]
            if needed:
                raise UnmaskError(f"{source} lacks the LLaDA2 MoE key(s) {', '.join(needed)}")
            top_k = int(raw["num_experts_per_tok"])
            router = RouterConfig(num_experts=int(raw["num_experts"]), top_k=top_k, score="sigmoid",
                                  renormalize=top_k > 1, scaling=float(raw.get("routed_scaling_factor", 1.0)),
                                  n_group=int(raw.get("n_group") or 1), topk_group=int(raw.get("topk_group") or 1),
                                  expert_bias=True, float32_logits=True)
            router.check(source)
        shared = raw.get("num_shared_experts")
        version = "2.1" if str(raw.get("model_type", "")).lower() == "llada21_moe" else "2.0"
        return cls(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rotary_dim=rotary,
            rope_theta=float(raw.get("rope_theta", 600000.0)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            intermediate_size=int(raw["intermediate_size"]),
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
            num_shared_experts=int(shared or 0), router=router, use_qkv_bias=bool(raw.get("use_qkv_bias", False)),
            use_qk_norm=bool(raw.get("use_qk_norm", True)), use_bias=bool(raw.get("use_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), mask_token_id=raw.get("mask_token_id"),
            eos_token_id=raw.get("eos_token_id", 156892), pad_token_id=raw.get("pad_token_id"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)), version=version)


class LLaDA2Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, width, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.use_bias)
        self.attn = SelfAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x, rope, key_mask, cache=None, positions=None, attn_block=None):
        cfg = self.cfg
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).view(batch, seq, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        q = qkv[:, :, : cfg.num_heads].reshape(batch, seq, -1)  # head-major: [query heads | key heads | value heads]
        k = qkv[:, :, cfg.num_heads: cfg.num_heads + cfg.num_kv_heads].reshape(batch, seq, -1)
        v = qkv[:, :, cfg.num_heads + cfg.num_kv_heads:].reshape(batch, seq, -1)
        out = self.attn(q, k, v, rope, key_mask, cache, self.layer_idx, positions=positions, attn_block=attn_block,
                        q_norm=getattr(self, "query_layernorm", None), k_norm=getattr(self, "key_layernorm", None))
        return self.dense(out)


class LLaDA2Layer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = LLaDA2Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.router is None or layer_idx < cfg.first_k_dense_replace:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.router,
                                 shared_inter=cfg.moe_intermediate_size * cfg.num_shared_experts,
                                 shared_name="shared_experts", bias_in_gate=True)

    def forward(self, x, rope, key_mask, cache=None, positions=None, attn_block=None):
        x = x + self.attention(self.input_layernorm(x), rope, key_mask, cache, positions, attn_block)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Network(StackedNetwork):
    """input ids -> logits (batch, seq, vocab); parameter names match LLaDA2's safetensors."""

    block_causal = True
    embed_name = "word_embeddings"

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.rotary_dim, self.rope_theta, self.tied = cfg.rotary_dim, cfg.rope_theta, cfg.tie_word_embeddings
        self.model = nn.Module()
        self.model.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(LLaDA2Layer(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def _is_llada2(raw: dict) -> bool:
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return str(raw.get("model_type", "")).lower() in ("llada2_moe", "llada21_moe") or any("llada2" in a for a in archs)


def _special_ids(cfg: LLaDA2Config, raw: dict, tokenizer) -> dict:
    return family_ids(tokenizer, mask_id=cfg.mask_token_id, mask_token=MASK_TOKEN, default_mask=DEFAULT_MASK_ID,
                      eos=cfg.eos_token_id, turn_ends=(END_OF_TURN,), pad_id=cfg.pad_token_id,
                      max_length=cfg.max_position_embeddings, source="LLaDA2")


LLADA2 = register_architecture(
    Architecture(
        name="llada2",
        config_from_dict=LLaDA2Config.from_dict,
        network=LLaDA2Network,
        shifted=False,
        matches=_is_llada2,
        special_ids=_special_ids,
        block_diffusion=LLADA2_BLOCKS,
        strategy=lambda cfg, raw: "llada21" if cfg.version == "2.1" else "llada2",
        defaults=lambda cfg, raw: {"block_length": 32},
    )
)
