from dataclasses import dataclass

from unmask.decoding.policies.base import Decision, Policy, PolicyConfig
from unmask.decoding.policies.block_schedule import check_steps, check_threshold, steps_schedule, threshold_or_top
from unmask.decoding.registry import register_policy


@dataclass
class LLaDA2Config(PolicyConfig):
    threshold: float = 0.95  # commit every masked position above it ...
    steps: int = 0  # ... or at least this step's share of the block split over `steps` calls (0: one per position)

    def validate(self) -> None:
        super().validate()
        check_threshold("threshold", self.threshold)
        check_steps(self.steps)


@register_policy
class LLaDA2(Policy):
    """LLaDA2.0's decoder: the masked positions above 0.95, else the step's minimum count.

    From `generate` of the LLaDA2.0 checkpoints: per block of 32, each call
    commits every masked position whose confidence is above 0.95 when there are at least as many as
    the step's minimum count, else that many most confident ones; the minimum is the block split
    evenly over `steps` calls (32 by default: one position per call). On a LLaDA2 model a finished
    block holding EOS ends the decode (its stop rule). Confidence is the softmax probability of the
    argmax; with a temperature the loop's Gumbel draw replaces the reference's top-k/top-p sampling.
    """

    name = "llada2"
    Config = LLaDA2Config

    def decide(self, view, state):
        return Decision(commit=threshold_or_top(view, self.config.threshold, steps_schedule(view, self.config.steps)))
