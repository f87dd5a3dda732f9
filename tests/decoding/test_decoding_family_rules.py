"""The block-diffusion decoders' rules on hand-made views, worked by hand from each rule's text (the
reference fixtures test them end to end; SDAR's entropy-bounded rule has no runnable reference:
its branch in generate.py raises, so JetEngine's rule is what it is checked against here)."""

from __future__ import annotations

import math

import torch

from unmask.decoding.registry import parse_strategy
from unmask.testing import make_view, peaked


def _entropy_of(p: float, vocab: int) -> float:
    # a peaked distribution: p on the top token, the rest spread evenly
    rest = (1 - p) / (vocab - 1)
    return -(p * math.log(p) + (vocab - 1) * rest * math.log(rest))


def test_sdar_entropy_bounded_commits_the_lowest_entropies_while_their_sum_stays_below_the_bound():
    vocab = 6
    conf = [0.9, 0.6, 0.99, 0.95, 0.5]
    view = make_view(peaked([1, 2, 3, 4, 5], conf, vocab), masked=[[True, True, True, False, True]])
    h = {i: _entropy_of(c, vocab) for i, c in enumerate(conf)}
    # masked positions by ascending entropy: 2 (0.99), 0 (0.9), 1 (0.6), 4 (0.5); position 3 is not masked
    order = sorted([0, 1, 2, 4], key=lambda i: h[i])
    assert order == [2, 0, 1, 4]
    running, expected = 0.0, []
    for i in order:
        running += h[i]
        if running < 0.8:
            expected.append(i)
    assert expected == [2, 0]  # 0.078 + 0.445 < 0.8, and the next one crosses it
    decision = parse_strategy("sdar:rule=entropy_bounded,eb_threshold=0.8").decide(view, None)
    assert decision.commit[0].nonzero().squeeze(1).tolist() == sorted(expected)
    # a bound below the lowest entropy still commits one position
    decision = parse_strategy("sdar:rule=entropy_bounded,eb_threshold=0.01").decide(view, None)
    assert decision.commit[0].nonzero().squeeze(1).tolist() == [2]


def test_llada2_commits_above_the_threshold_or_the_steps_minimum():
    # block of 4, 2 steps: the minimum is 2 per call; 0.97 alone is above 0.95, too few, so the two
    # most confident; with 0.97 and 0.96 both above, both, and with three above, all three
    view = make_view(peaked([1, 2, 3, 4], [0.97, 0.5, 0.9, 0.3], 6))
    assert parse_strategy("llada2:steps=2").decide(view, None).commit[0].tolist() == [True, False, True, False]
    view = make_view(peaked([1, 2, 3, 4], [0.97, 0.96, 0.99, 0.3], 6))
    assert parse_strategy("llada2:steps=2").decide(view, None).commit[0].tolist() == [True, True, True, False]
    # steps 0: one per call at least; 3 steps over 4 positions: 2, 1, 1 (the first call gets the rest)
    view = make_view(peaked([1, 2, 3, 4], [0.6, 0.5, 0.9, 0.3], 6))
    assert parse_strategy("llada2:steps=3").decide(view, None).commit[0].tolist() == [True, False, True, False]


def test_fastdllm_v2_works_in_the_first_sub_block_that_holds_a_mask():
    # sub-blocks of 2: positions 0-1 are decided, so sub-block 1 (positions 2-3) is current: 0.95 is
    # above 0.9 and position 3 is its most confident; the 0.99 in sub-block 2 waits
    view = make_view(peaked([1, 2, 3, 4, 5, 1], [0.9, 0.9, 0.6, 0.95, 0.99, 0.3], 6),
                     masked=[[False, False, True, True, True, True]])
    commit = parse_strategy("fastdllm_v2:sub_block=2").decide(view, None).commit[0].tolist()
    assert commit == [False, False, False, True, False, False]


def test_llada21_edits_decided_tokens_it_now_doubts_and_holds_the_block_open():
    # nothing masked: the call is a post step; position 1's token (3) differs from its new argmax (2)
    # with probability 0.95 > 0.9: an edit; the block stays open for another call
    view = make_view(peaked([1, 2, 3], [0.99, 0.95, 0.5], 6), masked=[[False, False, False]])
    view.tokens = torch.tensor([[1, 3, 4]])
    policy = parse_strategy("llada21")
    state = policy.init_state(1, 3, "cpu")
    decision = policy.decide(view, state)
    assert decision.edit[0].tolist() == [False, True, False] and decision.hold.tolist() == [True]
    # the next post step edits nothing: the block closes
    view.tokens = torch.tensor([[1, 2, 4]])
    view.block_step = torch.tensor([1])
    decision = policy.decide(view, state)
    assert not decision.edit.any() and decision.hold.tolist() == [False]
    # a prompt tail in the block is never edited
    view.tokens = torch.tensor([[1, 3, 4]])
    view.fixed = torch.tensor([[False, True, False]])
    assert not policy.decide(view, policy.init_state(1, 3, "cpu")).edit.any()


def test_every_sdar_rule_decodes_the_same_with_and_without_the_cache():
    from pathlib import Path

    from unmask.decoding import generate
    from unmask.models import load_model

    model = load_model(str(Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "sdar" / "checkpoint"))
    for rule in ("dynamic", "static", "entropy_bounded"):
        runs = [generate(model, ["tom has 5 apples and", "hello"], f"sdar:rule={rule}", gen_length=12, block_length=4,
                         cache=cache, chat=False).sequences for cache in ("none", "dual")]
        assert [s.tokens for s in runs[0]] == [s.tokens for s in runs[1]], rule
        assert all(model.mask_id not in s.tokens for s in runs[0] if not s.stopped_early), rule
