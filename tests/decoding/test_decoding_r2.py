"""R²-dLLM's rules on hand-made distributions where the right decision is known."""

import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.testing import make_view, peaked, tiny_llada

V = 12  # token 0 plays the mask; predictions use 2..11


def _probs(targets, confidences):
    return peaked(targets, confidences, V)


def _decide(strategy, probs, masked=None, stable=None, state=None):
    policy = parse_strategy(strategy)
    view = make_view(probs, masked=masked, stable=stable)
    state = state if state is not None else policy.init_state(view.batch, view.block_length, torch.device("cpu"))
    return policy, policy.decide(view, state), state


ONLY_CLUSTER = "r2:tau=0.99,conf_window=0,ambiguity_radius=0,k=64"


def test_a_cluster_of_three_equal_tokens_commits_exactly_one_position_the_most_confident():
    # positions 1-3 all predict token 5; position 2 is the most confident; all clear tau_s
    probs = _probs([2, 5, 5, 5, 3, 4], [0.3, 0.85, 0.95, 0.9, 0.3, 0.2])
    _, decision, _ = _decide(ONLY_CLUSTER.replace("tau=0.99", "tau=0.8"), probs)
    assert decision.commit[0].tolist() == [False, False, True, False, False, False]
    assert decision.events["cluster_collapses"].tolist() == [1.0]


def test_a_cluster_below_tau_s_commits_nothing_of_it_and_the_step_still_progresses():
    probs = _probs([2, 5, 5, 3], [0.95, 0.7, 0.75, 0.2])
    _, decision, _ = _decide(ONLY_CLUSTER.replace("tau=0.99", "tau=0.9"), probs)
    assert decision.commit[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("score, commits", [("own", False), ("sum", True), ("mean", False)])
def test_cluster_score_own_sum_mean(score, commits):
    probs = _probs([5, 5, 2], [0.6, 0.7, 0.99])
    _, decision, _ = _decide(f"{ONLY_CLUSTER},cluster_score={score}", probs)
    assert bool(decision.commit[0, 1]) is commits  # i* = position 1 (0.7); sum 1.3 > 0.8, mean 0.65
    assert not bool(decision.commit[0, 0])


def test_positional_ambiguity_commits_spread_mass_once_at_the_best_place():
    # token 7 gets 0.5 at position 1 and 0.4 at position 2: one confident prediction, best at 1
    rows = [{2: 0.95}, {7: 0.5, 3: 0.45}, {7: 0.4, 4: 0.35}, {9: 0.3, 10: 0.25}]
    probs = torch.zeros(4, V)
    for i, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (V - 1 - len(row))
        probs[i, 1:] = rest
        for token, p in row.items():
            probs[i, token] = p
    _, decision, _ = _decide("r2:conf_window=0,k=64", probs)
    assert decision.commit[0].tolist() == [True, True, False, False]
    assert decision.events["ambiguity_merges"].tolist() == [1.0]
    _, without, _ = _decide("r2:conf_window=0,k=64,ambiguity_radius=0", probs)
    assert without.commit[0].tolist() == [True, False, False, False]


def test_a_position_stable_for_k_steps_commits_and_an_oscillating_one_does_not():
    policy = parse_strategy("r2:tau=0.99,tau_s=0.99,tau_t=0.6,k=3,conf_window=0,ambiguity_radius=0")
    state = policy.init_state(1, 3, torch.device("cpu"))
    # position 0: top-1 stays token 4 (conf 0.7) for 3 calls; position 1 flips between 5 and 6
    # each call (its stable count restarts at 1); position 2 is a confident anchor
    # (position 2, at 0.95 but below every threshold, takes the step's forced commit each time)
    history = [([4, 5, 2], [1, 1, 1]), ([4, 6, 2], [2, 1, 1]), ([4, 5, 2], [3, 1, 1])]
    for call, (targets, stable) in enumerate(history):
        view = make_view(_probs(targets, [0.7, 0.7, 0.95]), stable=stable, block_step=call)
        decision = policy.decide(view, state)
        if call < 2:
            assert not bool(decision.commit[0, 0])
    assert bool(decision.commit[0, 0]) and not bool(decision.commit[0, 1])
    assert decision.events["temporal_finalizations"].tolist() == [1.0]


@pytest.mark.parametrize("stat, commits", [("last", False), ("mean", True), ("max", True)])
def test_temporal_statistic_over_the_window(stat, commits):
    policy = parse_strategy(f"r2:tau=0.99,tau_s=0.99,tau_t=0.8,k=2,conf_window=0,ambiguity_radius=0,temporal_stat={stat}")
    state = policy.init_state(1, 2, torch.device("cpu"))
    policy.decide(make_view(_probs([4, 2], [0.95, 0.97]), stable=[1, 1]), state)
    decision = policy.decide(make_view(_probs([4, 2], [0.7, 0.97]), stable=[2, 1], block_step=1), state)
    assert bool(decision.commit[0, 0]) is commits  # last 0.7 < 0.8; mean 0.825; max 0.95


def test_confidence_window_commits_a_window_whose_mean_clears_tau_s():
    probs = _probs([2, 3, 4, 5, 6, 7], [0.95, 0.9, 0.7, 0.3, 0.2, 0.1])
    _, decision, _ = _decide("r2:tau=0.99,ambiguity_radius=0,k=64", probs)
    assert decision.commit[0].tolist() == [True, True, True, False, False, False]  # mean 0.85 >= 0.8


def test_r2_is_batch_invariant_and_never_more_calls_than_threshold_at_the_same_tau_on_a_model():
    model = tiny_llada(gen_length=16, block_length=8)
    prompts = ["hello world", "what is 3 plus 4 ?"]
    batch = generate(model, prompts, "r2")
    for prompt, seq in zip(prompts, batch.sequences):
        alone = generate(model, [prompt], "r2").sequences[0]
        assert alone.tokens == seq.tokens and alone.nfe == seq.nfe
        assert alone.events == seq.events


def test_bad_r2_parameters_are_refused():
    from unmask.errors import UnmaskError

    for bad in ("r2:tau_s=0", "r2:k=0", "r2:temporal_stat=median", "r2:cluster_score=max"):
        with pytest.raises(UnmaskError):
            parse_strategy(bad)
