from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class Margin(ScheduledPolicy):
    """Dream's margin order: commit the k masked positions with the largest top-1/top-2 margin.

    From Dream-v0's `alg='topk_margin'`. Departure: Dream decodes one fixed schedule over the whole
    sequence; here it runs inside the semi-autoregressive blocks like every policy (use
    block_length = gen_length for Dream's own setting).
    """

    name = "margin"

    def score(self, view):
        return view.margin
