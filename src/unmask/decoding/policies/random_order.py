from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class RandomOrder(ScheduledPolicy):
    """LLaDA random remasking: each step commits k masked positions chosen uniformly at random.

    From LLaDA's `remasking='random'`. The random numbers come from each sequence's own generator,
    so a prompt gives the same tokens alone or in a batch.
    """

    name = "random"

    def score(self, view):
        return view.uniform()
