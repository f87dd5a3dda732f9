from unmask.decoding.policies.base import Decision, Policy
from unmask.decoding.registry import register_policy


@register_policy
class OneShot(Policy):
    """Commit every position of the generation from the first call (NFE 1).

    The floor: it shows how much decoding order matters. It ignores blocks (the whole generation
    is one block), since committing block by block would already be an order.
    """

    name = "one_shot"
    whole_generation = True

    def decide(self, view, state):
        return Decision(commit=view.masked.clone())
