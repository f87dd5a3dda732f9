"""LLaDA's fixed schedule: how many tokens to commit at each step of a block.

Shared by the fixed-rate orders (low_confidence, random, margin, entropy), which differ only in the
score they rank masked positions by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, StepView, top_k_mask
from unmask.errors import UnmaskError


@dataclass
class ScheduledConfig(PolicyConfig):
    # total model calls for the whole generation; None = gen_length (one token per step, the
    # reference every speed-up is measured against). Split evenly over blocks, as LLaDA does.
    steps: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.steps is not None and self.steps <= 0:
            raise UnmaskError(f"steps must be a positive integer, got {self.steps}", field="steps")


def tokens_this_step(view: StepView, steps: int | None) -> torch.Tensor:
    """k per row for this step: floor(block / steps_per_block), +1 for the first (block mod steps_per_block) steps."""
    total = steps if steps is not None else view.gen_length
    if total % view.num_blocks:
        raise UnmaskError(
            f"steps {total} must be a multiple of the number of blocks ({view.num_blocks}); "
            f"use a multiple of {view.num_blocks}",
            field="steps",
        )
    per_block = max(1, min(total // view.num_blocks, view.block_length))
    base, extra = divmod(view.block_length, per_block)
    k = torch.full_like(view.block_step, base)
    return k + (view.block_step < extra).long()


class ScheduledPolicy(Policy):
    """Commit the k highest-scoring masked positions of the block, k from LLaDA's schedule."""

    Config = ScheduledConfig

    def score(self, view: StepView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, view: StepView, state) -> Decision:
        k = tokens_this_step(view, self.config.steps)
        return Decision(commit=top_k_mask(self.score(view), view.masked, k))
