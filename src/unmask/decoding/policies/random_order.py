from unmask.decoding.policies.schedule import ScheduledPolicy, dream_fraction, steps_per_block
from unmask.decoding.registry import register_policy
from unmask.errors import UnmaskError


@register_policy
class RandomOrder(ScheduledPolicy):
    """Random order: each step commits masked positions of the block chosen at random, none preferred.

    Decides which masked positions to commit, ignoring the model's scores. schedule=llada is LLaDA's
    `remasking='random'` (Nie et al., 2025, `generate.py`): k positions drawn uniformly, k from the
    even split. schedule=dream is Dream-v0's `alg='origin'` (Ye et al., 2025, `diffusion_generate`):
    every masked position is committed independently with probability 1 - s / t on Dream's grid
    (all of them at the block's last step), so a step may commit any number, also none; `alg_temp`
    has no meaning there and is refused. schedule=auto (the default) is dream for a Dream checkpoint.
    Departures: the random numbers come from each sequence's own generator (one per block position,
    drawn every step), so a prompt gives the same tokens alone or in a batch; under Dream's rule a
    block whose positions all came out before its last step ends there (Dream's loop would go on
    calling the model on the finished canvas); Dream's own setting is one block (block_length =
    gen_length), smaller blocks run its rule inside each block.
    """

    name = "random"

    def score(self, view):
        return view.uniform()

    def check_dream(self) -> None:
        if self.config.alg_temp:
            raise UnmaskError(
                f"alg_temp={self.config.alg_temp} has no meaning for random under Dream's schedule (Dream's "
                "'origin' rule commits each masked position with probability 1 - s / t); drop alg_temp",
                field="alg_temp")

    def dream_commit(self, view):
        n = steps_per_block(view, self.config.steps)
        p = dream_fraction(view.block_step, n, self.config.eps).to(view.masked.device)
        return view.masked & (view.uniform() < p[:, None])
