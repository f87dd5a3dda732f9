"""Registers the native LLaDA network with the checkpoint loader."""

from unmask.models.base import BlockDiffusion
from unmask.models.llada import LLaDAConfig, LLaDANetwork
from unmask.models.loading import Architecture, register_architecture

# a block-causal LLaDA network (`block_causal`, unmask's block-diffusion fine-tune): a block's first
# call computes the finished block before it again, writing its exact keys at no extra call (as
# LLaDA2 does); the loop's block stop rule
LLADA_BLOCKS = BlockDiffusion(store_calls=False, bonus=False, stop_rule="block")


def _is_llada(raw: dict) -> bool:
    archs = [a.lower() for a in raw.get("architectures") or []]
    if any("moe" in a or "llada2" in a for a in archs) or raw.get("num_experts"):
        return False  # LLaDA-MoE and LLaDA2 (their own modules); LLaDA-MoE's remote code says model_type "llada"
    return str(raw.get("model_type", "")).lower() == "llada" or any("llada" in a for a in archs)


def _special_ids(cfg: LLaDAConfig, raw: dict, tokenizer) -> dict:
    stop = [cfg.eos_token_id]
    eot = tokenizer.token_id("<|eot_id|>")  # LLaDA-Instruct ends a turn with it before EOS padding
    if eot is not None and eot not in stop:
        stop.append(eot)
    return dict(
        mask_id=int(cfg.mask_token_id),
        eos_id=int(cfg.eos_token_id),
        stop_ids=tuple(int(s) for s in stop),
        pad_id=int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id),
        max_length=int(cfg.max_sequence_length),
    )


LLADA = register_architecture(
    Architecture(
        name="llada",
        config_from_dict=LLaDAConfig.from_dict,
        network=LLaDANetwork,
        shifted=False,
        matches=_is_llada,
        special_ids=_special_ids,
        block_diffusion=lambda cfg, raw: LLADA_BLOCKS if cfg.block_causal else None,
    )
)
