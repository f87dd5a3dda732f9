from unmask.decoding.policies.schedule import ScheduledPolicy
from unmask.decoding.registry import register_policy


@register_policy
class LowConfidence(ScheduledPolicy):
    """Low-confidence order: each step commits the k most confident masked positions of the block.

    Decides which masked positions to commit: the k whose candidate token is most probable, k from
    the schedule. schedule=llada is LLaDA's `remasking='low_confidence'` (Nie et al., 2025,
    `generate.py`; k from the even split of each block's steps); schedule=dream is Dream-v0's
    `alg='maskgit_plus'` (Ye et al., 2025, `diffusion_generate`; k = int(m (1 - s / t)) on the grid
    linspace(1, eps, steps + 1), positions sampled from softmax(confidence / alg_temp) when alg_temp
    > 0). schedule=auto (the default) is dream for a Dream checkpoint, llada otherwise.
    Departures: softmax in float32, not float64 (docs/concepts.md: confidence); ties break towards
    the left position; with temperature > 0 the confidence is the un-noised probability of the
    sampled candidate (Dream reads it from the tempered, top-p/top-k filtered distribution). Dream
    decodes the whole generation as one block: its own setting is schedule=dream with block_length =
    gen_length, and smaller blocks run Dream's rule inside each block with its share of the steps.
    """

    name = "low_confidence"

    def score(self, view):
        return view.confidence
