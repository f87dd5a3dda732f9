"""Native SDAR (JetLM/SDAR-1.7B/4B/8B-Chat, and the SDAR-30B-A3B mixture of experts): block diffusion on Qwen3.

Qwen3's layout exactly (`model.layers.N.self_attn.{q,k,v,o}_proj` without biases, per-head
`q_norm` / `k_norm` before RoPE, an explicit `head_dim`), loaded by its own names and keys; the MoE
variant (`model_type` "sdar_moe") routes as Qwen3-MoE does: a float32 softmax, top-k, renormalised
when `norm_topk_prob`, sparse layers every `decoder_sparse_step` except `mlp_only_layers`. Its norm
multiplies by the weight in float32 before casting back (the reference's fused kernel).

Attention is block-causal with blocks of the decode's block length anchored at position 0 (SDAR's
`block_size`, 4 for the released models, is the default block length). The reference decoder
(`generate.py`) writes the prompt's complete blocks in a prefill call and each finished block in a
store call of its own, and stops after a finished block once a stop id (`<|im_end|>`,
`<|endoftext|>`) appears in the generation: `BlockDiffusion(store_calls=True, stop_rule="block")`.
Logits are not shifted. The mask token is `<|MASK|>` (151669).
"""

from __future__ import annotations

from dataclasses import dataclass

from unmask.errors import UnmaskError
from unmask.models.base import BlockDiffusion
from unmask.models.decoder import DecoderNetwork, LayerMLP, Layout, check_common, family_ids
from unmask.models.loading import Architecture, register_architecture
from unmask.models.moe import RouterConfig

MASK_TOKEN = "<|MASK|>"
DEFAULT_MASK_ID = 151669
SDAR_BLOCKS = BlockDiffusion(store_calls=True, bonus=False, stop_rule="block")


@dataclass
class SDARConfig:
    layout: Layout
    block_size: int = 4
    mask_token_id: int | None = None
    eos_token_id: int | list | None = 151643
    pad_token_id: int | None = None
    max_position_embeddings: int = 32768

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rope_theta")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "SDARConfig":
        missing = [k for k in cls.REQUIRED if raw.get(k) is None]
        moe = str(raw.get("model_type", "")).lower() == "sdar_moe"
        if not moe and raw.get("intermediate_size") is None:
            missing.append("intermediate_size")
        if missing:
            raise UnmaskError(f"{source} lacks the SDAR key(s) {', '.join(missing)}; is this an SDAR checkpoint?")
        check_common(raw, source, "SDAR")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        kv = int(raw.get("num_key_value_heads") or heads)
        if heads % kv:
            raise UnmaskError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        layers = int(raw["num_hidden_layers"])
        mlps = [LayerMLP(int(raw.get("intermediate_size") or 0)) for _ in range(layers)]
        if moe:
            needed = [k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if raw.get(k) is None]
            if needed:
                raise UnmaskError(f"{source} lacks the SDAR-MoE key(s) {', '.join(needed)}")
            router = RouterConfig(num_experts=int(raw["num_experts"]), top_k=int(raw["num_experts_per_tok"]),
                                  score="softmax", renormalize=bool(raw.get("norm_topk_prob", False)))
            router.check(source)
            dense_only = set(raw.get("mlp_only_layers") or [])
            step = int(raw.get("decoder_sparse_step", 1) or 1)
            for i in range(layers):
                if i not in dense_only and (i + 1) % step == 0:
                    mlps[i] = LayerMLP(int(raw["moe_intermediate_size"]), router)
                elif not mlps[i].inter:
                    raise UnmaskError(f"{source}: layer {i} is dense but intermediate_size is missing")
        bias = bool(raw.get("attention_bias"))
        layout = Layout(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
            head_dim=head_dim, rope_theta=float(raw["rope_theta"]), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            mlps=mlps, qkv_bias=bias, o_bias=bias, qk_norm=True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), block_causal=True,
            norm_weight_in_float32=True)
        return cls(layout=layout, block_size=int(raw.get("block_size") or 4), mask_token_id=raw.get("mask_token_id"),
                   eos_token_id=raw.get("eos_token_id", 151643), pad_token_id=raw.get("pad_token_id"),
                   max_position_embeddings=int(raw.get("max_position_embeddings", 32768)))


def _is_sdar(raw: dict) -> bool:
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return str(raw.get("model_type", "")).lower() in ("sdar", "sdar_moe") or any(a.startswith("sdar") for a in archs)


def _special_ids(cfg: SDARConfig, raw: dict, tokenizer) -> dict:
    # generate.py stops on generation_config's eos ids: <|im_end|> and <|endoftext|>
    return family_ids(tokenizer, mask_id=cfg.mask_token_id, mask_token=MASK_TOKEN, default_mask=DEFAULT_MASK_ID,
                      eos=cfg.eos_token_id, turn_ends=("<|im_end|>", "<|endoftext|>"), pad_id=cfg.pad_token_id,
                      max_length=cfg.max_position_embeddings, source="SDAR", pad_last=True)


SDAR = register_architecture(
    Architecture(
        name="sdar",
        config_from_dict=SDARConfig.from_dict,
        network=lambda cfg: DecoderNetwork(cfg.layout),
        shifted=False,
        matches=_is_sdar,
        special_ids=_special_ids,
        block_diffusion=SDAR_BLOCKS,
        strategy=lambda cfg, raw: "sdar",
        defaults=lambda cfg, raw: {"block_length": cfg.block_size},
    )
)
