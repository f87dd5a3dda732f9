import math
from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class FactorConfig(PolicyConfig):
    factor: float = 1.0  # f: commit the top n while c_(j) >= 1 - f / (j + 1)

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise UnmaskError(f"factor must be > 0, got {self.factor}", field="factor")


@register_policy
class Factor(Policy):
    """Fast-dLLM's factor rule: sort masked confidences c_(1) >= c_(2) >= ...; commit the top n
    while c_(j) >= 1 - f / (j + 1) (j from 1), and always the first.

    From Fast-dLLM's factor-based parallel decoding (the bound (n + 1)(1 - c_(n)) < f). The more
    tokens go out at once, the more confident each must be.
    """

    name = "factor"
    Config = FactorConfig

    def decide(self, view, state):
        score = view.confidence.masked_fill(~view.masked, float("-inf"))
        sorted_conf, order = torch.sort(score, dim=-1, descending=True, stable=True)
        j = torch.arange(1, score.shape[-1] + 1, device=score.device, dtype=sorted_conf.dtype)
        ok = sorted_conf >= 1.0 - self.config.factor / (j + 1.0)
        ok[:, 0] = True  # the first always goes
        n = torch.cumprod(ok.long(), dim=-1).sum(-1)  # length of the prefix that satisfies the rule
        take_sorted = j[None, :] <= n[:, None]
        commit = torch.zeros_like(view.masked)
        commit.scatter_(-1, order, take_sorted)
        return Decision(commit=commit & view.masked)
