from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident
from unmask.decoding.policies.block_schedule import check_threshold
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class FastDLLMv2Config(PolicyConfig):
    threshold: float = 0.9  # within the sub-block: every masked position strictly above it, and the most confident
    sub_block: int = 8  # sub-blocks of the block, decoded left to right

    def validate(self) -> None:
        super().validate()
        check_threshold("threshold", self.threshold)
        if self.sub_block < 1:
            raise UnmaskError(f"sub_block must be >= 1, got {self.sub_block}", field="sub_block")


@register_policy
class FastDLLMv2(Policy):
    """Fast-dLLM v2's decoder: sub-blocks left to right, the current one's confident masks and its best.

    From its checkpoints' `generate`: each block of 32 is decoded in sub-blocks of 8, left to right; each call commits, in the first sub-block that still holds a
    mask, every masked position whose confidence is above 0.9 and always the most confident one.
    The reference's own default is 1 (one position per call); 0.9 is the setting its README, chat
    demo and evaluation script use. On a Fast-dLLM v2 model the loop adds the family's block
    transition: a finalize call over each finished block, whose last position's prediction is the
    next block's first token, committed greedily, and the decode stops as soon as `<|im_end|>` is
    committed with nothing masked before it.
    """

    name = "fastdllm_v2"
    Config = FastDLLMv2Config

    def decide(self, view, state):
        cfg = self.config
        offsets = torch.arange(view.masked.shape[1], device=view.masked.device)[None, :]
        sub = offsets // cfg.sub_block
        first = torch.where(view.masked, sub, torch.full_like(sub, sub.shape[1])).amin(-1, keepdim=True)
        allowed = view.masked & (sub == first)
        commit = allowed & (view.confidence > cfg.threshold)
        return Decision(commit=commit | most_confident(view.confidence, allowed))
