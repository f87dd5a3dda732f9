from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class Entropy(ScheduledPolicy):
    """Dream's entropy order: commit the k masked positions whose distribution has the lowest entropy.

    From Dream-v0's `alg='entropy'` (confidence = negative entropy). Same block departure as margin.
    """

    name = "entropy"

    def score(self, view):
        return -view.entropy
