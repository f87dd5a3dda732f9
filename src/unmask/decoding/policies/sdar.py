from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, top_k_mask
from unmask.decoding.policies.block_schedule import check_steps, check_threshold, steps_schedule, threshold_or_top
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError

RULES = ("dynamic", "static", "entropy_bounded")


@dataclass
class SDARPolicyConfig(PolicyConfig):
    rule: str = "dynamic"  # dynamic (low_confidence_dynamic) | static (low_confidence_static) | entropy_bounded
    threshold: float = 0.85  # dynamic: every masked position above it, else the step's minimum
    eb_threshold: float = 0.35  # entropy_bounded: the bound on the summed entropy of a call's commits
    steps: int = 0  # denoising calls per block (0: the block length, SDAR's 4 at blocks of 4)

    def validate(self) -> None:
        super().validate()
        if self.rule not in RULES:
            raise UnmaskError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}", field="rule")
        check_threshold("threshold", self.threshold)
        check_steps(self.steps)
        if self.eb_threshold <= 0:
            raise UnmaskError(f"eb_threshold must be > 0, got {self.eb_threshold}", field="eb_threshold")


@register_policy
class SDAR(Policy):
    """SDAR's decoder: low_confidence_dynamic (above 0.85, else the step's minimum), static or entropy-bounded.

    From JetAstra/SDAR's `generate.py` and the authors' evaluation path: per block of 4
    with 4 denoising calls, the step's minimum count is the block split evenly over the calls.

    - dynamic (default, `low_confidence_dynamic` at 0.85): every masked position whose confidence
      is above the threshold when there are at least the minimum, else the minimum most confident;
    - static (`low_confidence_static`): the minimum most confident;
    - entropy_bounded (the EB-sampler; `generate.py`'s own branch raises, so this is the rule
      SDAR's engine JetEngine implements): the masked positions in ascending entropy, as many as
      keep the running sum of their entropies below `eb_threshold` (at least one).

    Confidence is the softmax probability of the argmax before any top-k/top-p filter (the
    evaluation path's greedy decoding). On an SDAR model a finished block whose generation holds
    a stop id ends the decode, and with the cache each finished block is written by a call of its
    own, as the reference does.
    """

    name = "sdar"
    Config = SDARPolicyConfig

    def decide(self, view, state):
        cfg = self.config
        k = steps_schedule(view, cfg.steps)
        if cfg.rule == "dynamic":
            return Decision(commit=threshold_or_top(view, cfg.threshold, k))
        if cfg.rule == "static":
            return Decision(commit=top_k_mask(view.confidence, view.masked, torch.minimum(k, view.masked.sum(-1))))
        entropy = view.entropy.masked_fill(~view.masked, float("inf"))
        order = torch.sort(entropy, dim=-1, stable=True).indices
        sorted_entropy = entropy.gather(-1, order)
        running = sorted_entropy.cumsum(-1)
        count = (running < cfg.eb_threshold).sum(-1).clamp(min=1)
        count = torch.minimum(count, view.masked.sum(-1))
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return Decision(commit=view.masked & (ranks < count[:, None]))
