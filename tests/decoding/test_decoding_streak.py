"""The stability streak (`view.stable`): calls of the current block that recomputed a position and
found the same top-1. A block's first call starts every streak at 1; a cached call that left a
position out does not extend its streak (docs/methods.md: stability streak)."""

from __future__ import annotations

import pytest

from unmask.decoding import StepView, generate
from unmask.decoding.policies.low_confidence import LowConfidence
from unmask.testing import tiny_llada


class Spy(LowConfidence):
    """One token per call, in confidence order; keeps (block_step, stable) of every view."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, list[int]]] = []

    def decide(self, view: StepView, state):
        self.seen.append((int(view.block_step[0]), view.stable[0].tolist()))
        return super().decide(view, state)


def _steady(prompt, gen_tokens, g):
    # every position predicts the same token at every call, more confident further left, so
    # low_confidence commits one position per call from left to right
    return 10 + g % 5, 0.9 - 0.01 * g


def test_the_streak_counts_calls_of_the_block_and_restarts_at_each_block(scripted):
    model = scripted(_steady, gen_length=8, block_length=4)
    spy = Spy()
    generate(model, ["hi"], spy, early_stop=False)
    # two blocks of 4 positions, one commit per call: block_step 0..3 in each block. The top-1
    # never changes, so at block_step j every position of the block has been predicted j + 1 times
    # in this block: its streak is j + 1 (it used to run on across blocks: 5..8 in block 1)
    assert [b for b, _ in spy.seen] == [0, 1, 2, 3, 0, 1, 2, 3]
    for block_step, stable in spy.seen:
        assert stable == [block_step + 1] * 4, (block_step, stable)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_calls_count_only_what_they_recomputed(cache):
    # a random tiny model: its top-1s move, so the expected streak is worked from the recorded
    # top-1s by the rule (1 at a block's first call; +1 when the top-1 equals the previous call's
    # in the same block, else 1). Before the fix, positions of block 1 gained streak in block 0's
    # cached calls, which never recomputed them, and block 1 could start at 5.
    model = tiny_llada(gen_length=8, block_length=4)
    spy = Spy()
    trace = generate(model, ["hello there"], spy, cache=cache, early_stop=False, record_trace=True).sequences[0].trace
    assert len(spy.seen) == trace.steps
    expected = []
    for t in range(trace.steps):
        b = int(trace.block[t])
        cols = range(4 * b, 4 * b + 4)
        if t == 0 or trace.block[t - 1] != b:
            run = [1] * 4
        else:
            run = [run[i] + 1 if trace.top1[t, c] == trace.top1[t - 1, c] else 1 for i, c in enumerate(cols)]
        expected.append(run)
    assert [stable for _, stable in spy.seen] == expected
    assert all(stable == [1, 1, 1, 1] for block_step, stable in spy.seen if block_step == 0)


def test_a_changed_top1_restarts_the_streak(scripted):
    def plan(prompt, gen_tokens, g):
        # position 1 predicts 20 while position 0 is masked, 21 after; the others never change
        if g == 1:
            return (20 if gen_tokens[0] == model.mask_id else 21), 0.5
        return 10 + g, 0.9 - 0.01 * g

    model = scripted(plan, gen_length=4, block_length=4)
    spy = Spy()
    generate(model, ["hi"], spy, early_stop=False)
    # call 0 commits position 0 (0.9), so position 1 flips from 20 to 21 at call 1 (streak back to
    # 1) and then holds (2 at call 2); position 2 is committed at call 1 (0.88 > 0.5), position 3
    # at call 2 (0.87 > 0.5), position 1 last
    streaks_of_position_1 = [stable[1] for _, stable in spy.seen]
    assert streaks_of_position_1 == [1, 1, 2, 3]
    assert [stable[3] for _, stable in spy.seen] == [1, 2, 3, 4]
