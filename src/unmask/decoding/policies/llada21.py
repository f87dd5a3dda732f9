from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, top_k_mask
from unmask.decoding.policies.block_schedule import check_threshold
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class LLaDA21Config(PolicyConfig):
    threshold: float = 0.95  # mask to token: every masked position above it (else the most confident)
    editing_threshold: float = 0.9  # token to token: a decided position whose new argmax is above it
    max_post_steps: int = 16  # calls of a block once no mask is left
    num_to_transfer: int = 1  # the least number of masks filled per call
    eos_early_stop: bool = False  # stop after a finished block holding EOS (the reference's default: decode all)

    def validate(self) -> None:
        super().validate()
        check_threshold("threshold", self.threshold)
        check_threshold("editing_threshold", self.editing_threshold)
        if self.max_post_steps < 0 or self.num_to_transfer < 1:
            raise UnmaskError("max_post_steps must be >= 0 and num_to_transfer >= 1", field="max_post_steps")


@register_policy
class LLaDA21(Policy):
    """LLaDA2.1's decoder with token editing: fills confident masks, rewrites tokens it now doubts.

    From `generate` of the LLaDA2.1 checkpoints.

    From one call's logits, two updates at once: every masked position above `threshold` is filled
    (at least `num_to_transfer`, the most confident), and every already decided position of the
    block (never the prompt's tail) whose argmax now differs from its token with probability above
    `editing_threshold` is rewritten. A block stays open after its last mask is filled: the next
    call may still edit; it closes after a call that started with no mask and edited nothing, or
    when `max_post_steps` mask-free calls have been made. Every call is one NFE; a rewrite is an
    event of the trace (`Trace.edited`) and counts nothing more as decided. The reference decodes
    every block (`eos_early_stop` off); with it, a finished block holding EOS ends the decode.
    """

    name = "llada21"
    Config = LLaDA21Config
    edits = True

    @property
    def stop_rule(self):
        return "block" if self.config.eos_early_stop else "none"

    def init_state(self, batch_size, gen_length, device):
        return {"post": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, view, state):
        cfg = self.config
        post = state["post"][view.rows]
        post = torch.where(view.block_step == 0, torch.zeros_like(post), post)
        active = view.masked.any(-1)  # masks at the start of this call
        post = post + (~active).long()
        confident = view.masked & (view.confidence > cfg.threshold)
        k = torch.minimum(torch.full_like(post, cfg.num_to_transfer), view.masked.sum(-1))
        commit = torch.where((confident.sum(-1) >= cfg.num_to_transfer)[:, None], confident,
                             top_k_mask(view.confidence, view.masked, k))
        edit = ~view.masked & ~view.fixed & (view.confidence > cfg.editing_threshold) & (view.candidate != view.tokens)
        # the next call happens unless this one started without masks and edited nothing, and only
        # while the mask-free calls stay within max_post_steps
        hold = ~(~active & ~edit.any(-1)) & (post + 1 <= cfg.max_post_steps)
        state["post"][view.rows] = post
        return Decision(commit=commit, edit=edit, hold=hold)
