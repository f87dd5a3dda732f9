"""Native Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B): block diffusion on Qwen2.5.

Qwen2's layout exactly (biases on q/k/v, none on o; the 1.5B ties its head to the embeddings),
loaded by its own names and keys (`bd_size`: the block length, 32). Attention is block-causal in
blocks anchored at position 0, and the logits are those of the causal LM it was adapted from:
position i's logits predict token i+1, so a masked position is read from the position before it
(`shifted`). The reference decoder writes the prompt's complete blocks in a prefill call and each
finished block in a finalize call, whose last position predicts the next block's first token,
committed at once and greedily; it stops as soon as `<|im_end|>` is committed with nothing masked
before it: `BlockDiffusion(store_calls=True, bonus=True, stop_rule="answer")`. The mask token is
`|<MASK>|` (151665), added to Qwen2.5's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from unmask.errors import UnmaskError
from unmask.models.base import BlockDiffusion
from unmask.models.decoder import DecoderNetwork, LayerMLP, Layout, check_common, family_ids
from unmask.models.loading import Architecture, register_architecture

MASK_TOKEN = "|<MASK>|"
DEFAULT_MASK_ID = 151665
FASTDLLM_V2_BLOCKS = BlockDiffusion(store_calls=True, bonus=True, stop_rule="answer")


@dataclass
class FastDLLMv2Config:
    layout: Layout
    bd_size: int = 32
    mask_token_id: int | None = None
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    max_position_embeddings: int = 32768

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "FastDLLMv2Config":
        missing = [k for k in cls.REQUIRED if raw.get(k) is None]
        if missing:
            raise UnmaskError(f"{source} lacks the Fast-dLLM v2 key(s) {', '.join(missing)}; is this a Fast-dLLM v2 "
                              "checkpoint?")
        check_common(raw, source, "Fast-dLLM v2")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        kv = int(raw.get("num_key_value_heads") or heads)
        if hidden % heads or heads % kv:
            raise UnmaskError(f"{source}: {hidden} / {heads} heads / {kv} KV heads is not a Qwen2 attention layout")
        if raw.get("head_dim") not in (None, hidden // heads):
            raise UnmaskError(f"{source}: head_dim {raw['head_dim']} differs from hidden_size / num_attention_heads")
        layers = int(raw["num_hidden_layers"])
        layout = Layout(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
            head_dim=hidden // heads, rope_theta=float(raw.get("rope_theta", 1e6)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            mlps=[LayerMLP(int(raw["intermediate_size"])) for _ in range(layers)], qkv_bias=True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), block_causal=True)
        return cls(layout=layout, bd_size=int(raw.get("bd_size") or 32), mask_token_id=raw.get("mask_token_id"),
                   eos_token_id=raw.get("eos_token_id", 151645), pad_token_id=raw.get("pad_token_id"),
                   max_position_embeddings=int(raw.get("max_position_embeddings", 32768)))


def _is_fastdllm_v2(raw: dict) -> bool:
    archs = [str(a).lower() for a in raw.get("architectures") or []]
    return str(raw.get("model_type", "")).lower() == "fast_dllm_qwen" or any("fast_dllm" in a for a in archs)


def _special_ids(cfg: FastDLLMv2Config, raw: dict, tokenizer) -> dict:
    # the reference decoders stop on <|im_end|> only (config.json's eos_token_id)
    return family_ids(tokenizer, mask_id=cfg.mask_token_id, mask_token=MASK_TOKEN, default_mask=DEFAULT_MASK_ID,
                      eos=cfg.eos_token_id, turn_ends=(), pad_id=cfg.pad_token_id,
                      max_length=cfg.max_position_embeddings, source="Fast-dLLM v2")


FASTDLLM_V2 = register_architecture(
    Architecture(
        name="fastdllm_v2",
        config_from_dict=FastDLLMv2Config.from_dict,
        network=lambda cfg: DecoderNetwork(cfg.layout),
        shifted=True,
        matches=_is_fastdllm_v2,
        special_ids=_special_ids,
        block_diffusion=FASTDLLM_V2_BLOCKS,
        strategy=lambda cfg, raw: "fastdllm_v2",
        defaults=lambda cfg, raw: {"block_length": cfg.bd_size},
    )
)
