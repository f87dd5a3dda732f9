"""Native LLaDA-MoE (LLaDA-MoE-7B-A1B-Base / -Instruct and checkpoints of the same layout).

A bidirectional mixture-of-experts dLLM in OLMoE's layout (`model.layers.N.self_attn.q_proj`,
per-head `q_norm` / `k_norm` before RoPE, `mlp.gate`, `mlp.experts.E.gate_proj`, a shared expert on
the layer as `shared_expert`), loaded by its own tensor names and config keys. Its router takes a
float32 softmax of the router logits and keeps the top-k probabilities as they are (not
renormalised: the reference hard-codes `norm_topk_prob` off); an expert bias, when enabled, is added
to those probabilities, so it moves both the choice and the weights. `moe_layer_freq` lists, per
layer, 0 for a dense MLP and anything else for a sparse one. Keys the reference code reads but never
uses (`norm_topk_prob`, `moe_router_score_function`, `routed_scaling_factor`, `router_num_group`,
`router_topk_group`) are ignored here too, so a checkpoint decodes as its own code decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from unmask.errors import UnmaskError
from unmask.models.decoder import DecoderNetwork, LayerMLP, Layout, check_common, family_ids
from unmask.models.loading import Architecture, register_architecture
from unmask.models.moe import RouterConfig

MASK_TOKEN = "<|mask|>"
END_OF_TURN = "<|role_end|>"
DEFAULT_MASK_ID = 156895


@dataclass
class LLaDAMoEConfig:
    """The keys of LLaDA-MoE's config.json that shape the network; sizes default to LLaDA-MoE-7B-A1B's."""

    layout: Layout
    mask_token_id: int | None = None
    eos_token_id: int | None = 156892
    pad_token_id: int | None = None
    max_position_embeddings: int = 8192
    raw: dict | None = None

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                "num_experts_per_tok", "expert_intermediate_size", "partial_rotary_factor", "rope_theta")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "LLaDAMoEConfig":
        missing = [k for k in cls.REQUIRED if raw.get(k) is None]
        if missing:
            raise UnmaskError(f"{source} lacks the LLaDA-MoE key(s) {', '.join(missing)}; is this a LLaDA-MoE checkpoint?")
        check_common(raw, source, "LLaDA-MoE")
        layers = int(raw["num_hidden_layers"])
        freq = raw.get("moe_layer_freq", [1] * layers)
        if not isinstance(freq, list) or len(freq) < layers:
            raise UnmaskError(f"{source}: moe_layer_freq must list one entry per layer (0: dense, else MoE), "
                              f"got {freq!r}")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        if hidden % heads:
            raise UnmaskError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
        rotary = int(head_dim * float(raw["partial_rotary_factor"]))
        if rotary <= 0 or rotary > head_dim or rotary % 2:
            raise UnmaskError(f"{source}: partial_rotary_factor {raw['partial_rotary_factor']} gives {rotary} rotary "
                              f"dims of {head_dim}; it needs an even number between 2 and {head_dim}")
        router = RouterConfig(num_experts=int(raw["num_experts"]), top_k=int(raw["num_experts_per_tok"]),
                              score="softmax", renormalize=False,
                              expert_bias=bool(raw.get("moe_router_enable_expert_bias")), bias_in_weights=True)
        router.check(source)
        shared = raw.get("shared_expert_intermediate_size")
        if shared is not None and int(shared) <= 0:
            raise UnmaskError(f"{source}: shared_expert_intermediate_size {shared} is not a width; write null for "
                              "no shared expert")
        mlps = []
        for i in range(layers):
            if freq[i]:
                mlps.append(LayerMLP(int(raw["expert_intermediate_size"]), router, int(shared or 0)))
            else:
                if raw.get("dense_intermediate_size") is None:
                    raise UnmaskError(f"{source}: layer {i} is dense (moe_layer_freq 0) but dense_intermediate_size is missing")
                mlps.append(LayerMLP(int(raw["dense_intermediate_size"])))
        kv = int(raw.get("num_key_value_heads") or heads)
        if heads % kv:
            raise UnmaskError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        bias = bool(raw.get("attention_bias"))
        layout = Layout(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
            head_dim=head_dim, rope_theta=float(raw["rope_theta"]), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            mlps=mlps, rotary_dim=rotary if rotary != head_dim else None, qkv_bias=bias, o_bias=bias,
            qk_norm=bool(raw.get("qk_layernorm")), clip_qkv=raw.get("clip_qkv"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
        return cls(layout=layout, mask_token_id=raw.get("mask_token_id"), eos_token_id=raw.get("eos_token_id", 156892),
                   pad_token_id=raw.get("pad_token_id"),
                   max_position_embeddings=int(raw.get("max_position_embeddings", 8192)), raw=raw)


def _is_lladamoe(raw: dict) -> bool:
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return str(raw.get("model_type", "")).lower() == "lladamoe" or any("lladamoe" in a for a in archs)


def _special_ids(cfg: LLaDAMoEConfig, raw: dict, tokenizer) -> dict:
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.hf.eos_token_id
    return family_ids(tokenizer, mask_id=cfg.mask_token_id, mask_token=MASK_TOKEN, default_mask=DEFAULT_MASK_ID,
                      eos=eos, turn_ends=(END_OF_TURN,), pad_id=cfg.pad_token_id,
                      max_length=cfg.max_position_embeddings, source="LLaDA-MoE")


LLADAMOE = register_architecture(
    Architecture(
        name="lladamoe",
        config_from_dict=LLaDAMoEConfig.from_dict,
        network=lambda cfg: DecoderNetwork(cfg.layout),
        shifted=False,
        matches=_is_lladamoe,
        special_ids=_special_ids,
    )
)
