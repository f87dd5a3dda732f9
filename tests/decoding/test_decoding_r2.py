"""R²-dLLM's rules on hand-made distributions where the right decision follows from the rule's text.

The rules run in the reference order (base threshold -> confidence window -> token cluster ->
temporal finalization), each on the state the earlier ones left. Every expected commit below is
worked out by hand in the comment beside it.
"""

import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.errors import UnmaskError
from unmask.testing import make_view, peaked, tiny_llada

V = 12  # token 0 plays the mask; predictions use 2..11


def _probs(targets, confidences):
    return peaked(targets, confidences, V)


def _decide(strategy, probs, masked=None, stable=None):
    policy = parse_strategy(strategy)
    view = make_view(probs, masked=masked, stable=stable)
    state = policy.init_state(view.batch, view.block_length, torch.device("cpu"))
    return policy.decide(view, state)


def test_the_window_is_judged_after_the_base_rule():
    # base: 0.97 >= 0.9 commits position 0. The window [0, 1, 2] then holds 1 decided token
    # (allowed) and open positions 1, 2 with mean (0.70 + 0.75) / 2 = 0.725 < 0.8: nothing more.
    # (Judged before the base rule, the mean of all three, 0.807, would commit all three.)
    decision = _decide("r2", _probs([2, 3, 4], [0.97, 0.70, 0.75]))
    assert decision.commit[0].tolist() == [True, False, False]


def test_a_window_commits_its_open_positions_when_their_mean_clears_tau_s():
    # base commits position 0 (0.95). Windows, all judged on that state:
    #   [0,1,2]: 1 decided, open 1, 2: mean (0.85 + 0.80) / 2 = 0.825 >= 0.8 -> commit 1 and 2
    #   [1,2,3]: 0 decided, mean (0.85 + 0.80 + 0.2) / 3 = 0.617 -> no
    #   [2,3,4]: mean (0.80 + 0.2 + 0.1) / 3 = 0.367 -> no
    decision = _decide("r2", _probs([2, 3, 4, 5, 6], [0.95, 0.85, 0.80, 0.2, 0.1]))
    assert decision.commit[0].tolist() == [True, True, True, False, False]
    assert decision.events["window_commits"].tolist() == [2.0]


@pytest.mark.parametrize("allowed, commits_3", [(1, False), (2, True)])
def test_a_window_with_too_many_decided_tokens_is_skipped(allowed, commits_3):
    # positions 0, 1 decided earlier; base commits 2 (0.95, the most confident). Window [1,2,3]
    # then holds 2 decided tokens: skipped when at most 1 is allowed (the default), else its one
    # open position 3 has mean 0.82 >= 0.8 and commits. [2,3,4]: open 3, 4 mean 0.51 -> no.
    masked = [[False, False, True, True, True]]
    decision = _decide(f"r2:window_unmasked={allowed}", _probs([2, 3, 4, 5, 6], [0.9, 0.9, 0.95, 0.82, 0.2]), masked=masked)
    assert decision.commit[0].tolist() == [False, False, True, commits_3, False]


def test_adjacent_equal_tokens_above_tau_both_commit_as_under_threshold():
    # base commits both (0.95, 0.93 >= 0.9); the token-cluster rule only ever adds commits
    decision = _decide("r2", _probs([5, 5, 2, 3], [0.95, 0.93, 0.2, 0.1]))
    assert decision.commit[0].tolist() == [True, True, False, False]
    threshold = parse_strategy("threshold").decide(make_view(_probs([5, 5, 2, 3], [0.95, 0.93, 0.2, 0.1])), None)
    assert threshold.commit[0].tolist() == [True, True, False, False]


def test_a_token_cluster_commits_its_most_confident_position_once():
    # base commits position 3 (0.95). Windows: [0,1,2] mean (0.85 + 0.82 + 0.3) / 3 = 0.657 -> no;
    # [1,2,3] 1 decided, open 1, 2 mean 0.56 -> no. Cluster: positions 0-2 all predict 5, the most
    # confident is 0 at 0.85 > 0.8 -> commit 0 only.
    decision = _decide("r2", _probs([5, 5, 5, 2], [0.85, 0.82, 0.3, 0.95]))
    assert decision.commit[0].tolist() == [True, False, False, True]
    assert decision.events["cluster_commits"].tolist() == [1.0]


def test_a_token_cluster_below_tau_s_commits_nothing():
    # cluster 1-2 (token 5) peaks at 0.75, not > 0.8; only the base commit (position 0)
    decision = _decide("r2", _probs([2, 5, 5, 3], [0.95, 0.7, 0.75, 0.2]))
    assert decision.commit[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("choice, expected", [("confidence", [True, False, False, True]),
                                              ("mid", [False, True, False, True]),
                                              ("off", [False, False, False, True])])
def test_token_cluster_choice(choice, expected):
    # windows off; base commits 3 (0.95); run 0-2 of token 5: most confident is 0 (0.85), the
    # middle one is start + size // 2 = 1 (0.82 > 0.8)
    decision = _decide(f"r2:conf_window=0,token_cluster={choice}", _probs([5, 5, 5, 2], [0.85, 0.82, 0.81, 0.95]))
    assert decision.commit[0].tolist() == expected


@pytest.mark.parametrize("score, commits", [("own", False), ("sum", True), ("mean", False)])
def test_cluster_score_option(score, commits):
    # base commits 2 (0.99); cluster 0-1 (token 5), chosen position 1 (0.7): own 0.7, sum 1.3,
    # mean 0.65 against tau_s 0.8
    decision = _decide(f"r2:conf_window=0,cluster_score={score}", _probs([5, 5, 2], [0.6, 0.7, 0.99]))
    assert decision.commit[0].tolist() == [False, commits, True]


def test_positional_ambiguity_is_an_option_off_by_default():
    # token 7 has 0.5 at position 1 and 0.4 at position 2. Base commits 0 (0.95).
    # ambiguity_radius=1: position 1 sums 0.5 + 0.4 (open neighbour 2) = 0.9 >= 0.8 and is the
    # best place -> commit 1; position 2 sums 0.9 too but 0.4 < 0.5 is not the best place.
    # Then the cluster 1-2 has only position 2 open: no run. Default: the cluster's 0.5 is not
    # > 0.8 and nothing but position 0 commits.
    rows = [{2: 0.95}, {7: 0.5, 3: 0.45}, {7: 0.4, 4: 0.35}, {9: 0.3, 10: 0.25}]
    probs = torch.zeros(4, V)
    for i, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (V - 1 - len(row))
        probs[i, 1:] = rest
        for token, p in row.items():
            probs[i, token] = p
    assert _decide("r2", probs).commit[0].tolist() == [True, False, False, False]
    with_rule = _decide("r2:ambiguity_radius=1", probs)
    assert with_rule.commit[0].tolist() == [True, True, False, False]
    assert with_rule.events["ambiguity_merges"].tolist() == [1.0]


def _calls(policy, block, history):
    """Feed (masked, stable, targets, confidences) views one call after another; return decisions."""
    state = policy.init_state(1, block, torch.device("cpu"))
    out = []
    for call, (masked, stable, targets, confs) in enumerate(history):
        view = make_view(_probs(targets, confs), masked=[masked], stable=[stable], block_step=call)
        out.append(policy.decide(view, state))
    return out


def test_a_position_stable_for_k_calls_is_finalized_and_a_flipping_one_is_not():
    # windows and clusters off to isolate the rule. Position 0 holds token 4 at 0.85 (< tau 0.9)
    # for 3 calls; position 1 flips (streak 1 every call); anchors 2, 3, 4 (0.89, 0.88, 0.87) take
    # the base rule's forced commit one per call. At call 2 position 0's streak is 3 >= k and
    # 0.85 >= tau_t 0.8: it commits; position 1 does not.
    policy = parse_strategy("r2:conf_window=0,token_cluster=off")
    targets, confs = [4, 5, 6, 7, 8], [0.85, 0.3, 0.89, 0.88, 0.87]
    history = [
        ([True, True, True, True, True], [1, 1, 1, 1, 1], targets, confs),
        ([True, True, False, True, True], [2, 1, 2, 2, 2], [4, 9, 6, 7, 8], confs),
        ([True, True, False, False, True], [3, 1, 3, 3, 3], targets, confs),
    ]
    decisions = _calls(policy, 5, history)
    assert [d.commit[0].tolist() for d in decisions] == [
        [False, False, True, False, False],
        [False, False, False, True, False],
        [True, False, False, False, True],
    ]
    assert decisions[2].events["temporal_finalizations"].tolist() == [1.0]


@pytest.mark.parametrize("stat, commits", [("last", False), ("mean", True), ("max", True)])
def test_the_temporal_statistic_is_taken_over_the_whole_streak(stat, commits):
    # position 0 holds token 4 at 0.95, 0.75, 0.75 (tau 0.99 keeps the base rule off it; anchors
    # at 0.98 take the forced commits). At call 2 (streak 3 = k): last 0.75 < 0.8; mean over the
    # streak (0.95 + 0.75 + 0.75) / 3 = 0.817 >= 0.8; max 0.95.
    policy = parse_strategy(f"r2:tau=0.99,conf_window=0,token_cluster=off,temporal_stat={stat}")
    history = [
        ([True, True, True, True], [1, 1, 1, 1], [4, 5, 6, 7], [0.95, 0.98, 0.98, 0.98]),
        ([True, False, True, True], [2, 2, 2, 2], [4, 5, 6, 7], [0.75, 0.98, 0.98, 0.98]),
        ([True, False, False, True], [3, 3, 3, 3], [4, 5, 6, 7], [0.75, 0.98, 0.98, 0.98]),
    ]
    decisions = _calls(policy, 4, history)
    assert not bool(decisions[1].commit[0, 0])
    assert bool(decisions[2].commit[0, 0]) is commits


def test_the_temporal_rule_fires_in_a_real_decode_and_saves_a_call(scripted):
    # gen 8 in one block: A (position 0) holds token 10 at 0.85, B, C, D (2, 4, 6) at 0.89, 0.88,
    # 0.87, and four low positions at 0.3 between them (each window holds one, so no window mean
    # reaches 0.8; their tokens all differ, so no cluster). threshold commits one position per
    # call by confidence: B, C, D, A, then the four low ones: 8 calls. r2 at call 2 commits D by
    # the base rule and A by the temporal rule (streak 3, 0.85 >= 0.8): 7 calls.
    plan_table = {0: (10, 0.85), 2: (12, 0.89), 4: (14, 0.88), 6: (16, 0.87)}

    def plan(prompt, gen_tokens, g):
        return plan_table.get(g, (20 + g, 0.3))

    model = scripted(plan, gen_length=8, block_length=8)
    r2 = generate(model, ["hi"], "r2", early_stop=False, record_trace=True).sequences[0]
    threshold = generate(model, ["hi"], "threshold", early_stop=False).sequences[0]
    assert threshold.nfe == 8 and r2.nfe == 7
    assert r2.events["temporal_finalizations"] == 1.0
    assert r2.trace.commit_step.tolist()[:7:2] == [2, 0, 1, 2]
    assert r2.tokens == threshold.tokens


def test_r2_is_batch_invariant_on_a_model():
    model = tiny_llada(gen_length=16, block_length=8)
    prompts = ["hello world", "what is 3 plus 4 ?"]
    batch = generate(model, prompts, "r2")
    for prompt, seq in zip(prompts, batch.sequences):
        alone = generate(model, [prompt], "r2").sequences[0]
        assert alone.tokens == seq.tokens and alone.nfe == seq.nfe
        assert alone.events == seq.events


def test_bad_r2_parameters_are_refused():
    for bad in ("r2:tau_s=0", "r2:k=0", "r2:temporal_stat=median", "r2:cluster_score=max",
                "r2:token_cluster=random", "r2:window_unmasked=-1"):
        with pytest.raises(UnmaskError):
            parse_strategy(bad)
