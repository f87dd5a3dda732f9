from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class Margin(ScheduledPolicy):
    """Margin order: each step commits the k masked positions with the largest top-1/top-2 margin.

    Decides which masked positions to commit: the k where the model's two most probable tokens are
    furthest apart (p1 - p2), k from the schedule. From Dream-v0's `alg='topk_margin'` (Ye et al.,
    2025, `diffusion_generate`), whose schedule is schedule=dream: k = int(m (1 - s / t)) on the
    grid linspace(1, eps, steps + 1), all remaining at the last step, positions sampled from
    softmax(margin / alg_temp) when alg_temp > 0. schedule=auto (the default) is dream for a Dream
    checkpoint; on other models it is llada, LLaDA's even split, a pairing neither paper ships.
    Departures: the margin is read from the un-noised distribution (Dream takes it after temperature
    and top-p/top-k); ties break towards the left position. Dream decodes the whole generation as
    one block: its own setting is schedule=dream with block_length = gen_length, and smaller blocks
    run Dream's rule inside each block with its share of the steps.
    """

    name = "margin"

    def score(self, view):
        return view.margin
