from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class LowConfidence(ScheduledPolicy):
    """LLaDA low-confidence remasking: each step commits the k most confident masked positions.

    From LLaDA (Nie et al., 2025), `generate.py` with `remasking='low_confidence'`: k follows the
    fixed per-block schedule, confidence is the probability of the (possibly Gumbel-sampled)
    candidate under the un-noised distribution. Departure: softmax in float32, not float64
    (DESIGN.md); ties break towards the left position.
    """

    name = "low_confidence"

    def score(self, view):
        return view.confidence
