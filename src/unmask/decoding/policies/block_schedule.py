"""What the block-diffusion decoders share: the even split of a block over its steps, and the
threshold-or-minimum commit rule of LLaDA2.0 and SDAR."""

from __future__ import annotations

import torch

from unmask.decoding.policies.base import StepView, top_k_mask
from unmask.errors import UnmaskError


def steps_schedule(view: StepView, steps: int) -> torch.Tensor:
    """(batch,) the minimum count of this step: the block length split evenly over `steps` calls,
    the first (length mod steps) calls one more (LLaDA2's and SDAR's `get_num_transfer_tokens`);
    `steps` 0 means one call per position. Counted from the block's first call."""
    length = view.row_block_length
    steps_t = length if steps == 0 else torch.full_like(length, steps)
    base, extra = length // steps_t, length % steps_t
    return base + (view.block_step < extra).long()


def threshold_or_top(view: StepView, threshold: float, k: torch.Tensor) -> torch.Tensor:
    """Every masked position with confidence strictly above `threshold` when there are at least
    `k` of them, else the `k` most confident masked positions (fewer if fewer are masked)."""
    confident = view.masked & (view.confidence > threshold)
    enough = confident.sum(-1) >= k
    top = top_k_mask(view.confidence, view.masked, k)
    return torch.where(enough[:, None], confident, top)


def check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UnmaskError(f"{name} must be in [0, 1], got {value}", field=name)


def check_steps(value: int) -> None:
    if value < 0:
        raise UnmaskError(f"steps must be >= 0 (0: one per position of the block), got {value}", field="steps")
