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


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_call_recomputes_the_whole_block_so_every_streak_step_is_earned(cache):
    # the streak counts calls that recomputed a position; the loop extends it at every block
    # position because every call (full, prefix or dual) computes the whole current block. Record
    # what each call computed and check that: a cached call that left a block position out would
    # extend a streak it did not earn, and fails here
    model = tiny_llada(gen_length=16, block_length=4)
    computed = []
    features, features_at = model.features, model.features_at

    def full(*args, at=None, **kwargs):
        computed.append(set(at[0].tolist()))
        return features(*args, at=at, **kwargs)

    def partial(input_ids, position_ids, query_pos, *args, **kwargs):
        computed.append(set(query_pos[0].tolist()))
        return features_at(input_ids, position_ids, query_pos, *args, **kwargs)

    model.features, model.features_at = full, partial
    spy = Spy()
    positions = []
    original = spy.decide

    def decide(view, state):
        positions.append(set(view.positions[0].tolist()))
        return original(view, state)

    spy.decide = decide
    result = generate(model, ["hello there"], spy, cache=cache, early_stop=False)
    prompt = len(result.sequences[0].prompt_ids)
    assert len(computed) == len(positions) == result.sequences[0].nfe == 16
    for call, block in zip(computed, positions):
        assert {p + prompt for p in block} <= call
    # and the streak follows the rule: 1 at a block's first call, +1 while the top-1 holds
    assert [b for b, _ in spy.seen] == [0, 1, 2, 3] * 4
