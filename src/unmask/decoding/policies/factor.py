import math
from dataclasses import dataclass

import torch

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class FactorConfig(PolicyConfig):
    factor: float = 1.0  # f: commit the top n while c_(j) >= 1 - f / (j + 1)
    # departure (Fast-dLLM's public code, not its paper): when the only failing position is the
    # block's last masked one, commit it too
    last_goes: bool = False

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

    `last_goes=true` reproduces Fast-dLLM's public code, which departs from the published rule in
    one case: when every masked position of the block but the least confident passes (the first
    failure is at j = m, the block's last masked position), it commits all m. Use it to reproduce
    Fast-dLLM's reported figures. Default off: the rule as the paper writes it. Built-in model, dev
    split, n = 200: arith 0.870 at 16.88 NFE (rule) against 0.845 at 15.48 (last_goes, -8%); trace
    0.805 at 15.03 against 0.795 at 13.42 (-11%).
    """

    name = "factor"
    Config = FactorConfig
    departures = ("last_goes",)

    def decide(self, view, state):
        score = view.confidence.masked_fill(~view.masked, float("-inf"))
        sorted_conf, order = torch.sort(score, dim=-1, descending=True, stable=True)
        j = torch.arange(1, score.shape[-1] + 1, device=score.device, dtype=sorted_conf.dtype)
        ok = sorted_conf >= 1.0 - self.config.factor / (j + 1.0)
        ok[:, 0] = True  # the first always goes
        n = torch.cumprod(ok.long(), dim=-1).sum(-1)  # length of the prefix that satisfies the rule
        if self.config.last_goes:
            m = view.masked.sum(-1)
            n = torch.where(n == m - 1, m, n)  # only the last masked position failed: it goes too
        take_sorted = j[None, :] <= n[:, None]
        commit = torch.zeros_like(view.masked)
        commit.scatter_(-1, order, take_sorted)
        return Decision(commit=commit & view.masked)
