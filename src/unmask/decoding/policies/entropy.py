from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class Entropy(ScheduledPolicy):
    """Entropy order: each step commits the k masked positions whose distribution has the lowest entropy.

    Decides which masked positions to commit: the k the model is least uncertain about over the whole
    vocabulary (score = negative entropy), k from the schedule. From Dream-v0's `alg='entropy'` (Ye
    et al., 2025, `diffusion_generate`), whose schedule is schedule=dream: k = int(m (1 - s / t)) on
    the grid linspace(1, eps, steps + 1), all remaining at the last step, positions sampled from
    softmax(-entropy / alg_temp) when alg_temp > 0. schedule=auto (the default) is dream for a Dream
    checkpoint; on other models it is llada, LLaDA's even split, a pairing neither paper ships.
    Departures: the entropy is exact, of the un-noised distribution (Dream computes sum p log(p +
    1e-10) after temperature and top-p/top-k); ties break towards the left position. Dream decodes
    the whole generation as one block: its own setting is schedule=dream with block_length =
    gen_length, and smaller blocks run Dream's rule inside each block with its share of the steps.
    """

    name = "entropy"

    def score(self, view):
        return -view.entropy
