from dataclasses import dataclass

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig, most_confident
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@dataclass
class ThresholdConfig(PolicyConfig):
    tau: float = 0.9  # commit every masked position whose confidence reaches tau

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.tau <= 1.0:
            raise UnmaskError(f"tau must be in (0, 1], got {self.tau}", field="tau")


@register_policy
class Threshold(Policy):
    """Fast-dLLM's threshold rule: commit every masked position with confidence >= tau.

    From Fast-dLLM (Wu et al., 2025), confidence-aware parallel decoding. If no position qualifies,
    the single most confident one is committed (docs/concepts.md, "Commit"), so every step makes progress.
    """

    name = "threshold"
    Config = ThresholdConfig

    def decide(self, view, state):
        commit = view.masked & (view.confidence >= self.config.tau)
        none = ~commit.any(-1, keepdim=True)
        commit = commit | (most_confident(view.confidence, view.masked) & none)
        return Decision(commit=commit)
