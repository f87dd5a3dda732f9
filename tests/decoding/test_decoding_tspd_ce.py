"""Confidence Extrapolation: the Kalman forecast, look-ahead, holds, and whole decodes."""

import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.decoding.policies.ce import kalman_forecast, kalman_init, kalman_step
from unmask.testing import make_view, peaked, tiny_llada

V = 12
Q, R = 1e-3, 1e-2


def test_kalman_forecast_extrapolates_a_linear_margin_and_its_variance_shrinks_with_observations():
    margins = torch.tensor([0.10 + 0.07 * t for t in range(8)])
    x, p = kalman_init(margins[0], R)
    variances = []
    for t in range(1, len(margins)):
        x, p = kalman_step(x, p, margins[t], Q, R)
        variances.append(float(kalman_forecast(x, p, 3, Q)[1][1]))
    mean, var = kalman_forecast(x, p, 3, Q)
    expected = [0.10 + 0.07 * (7 + h) for h in (1, 2, 3)]
    assert mean.tolist() == pytest.approx(expected, abs=0.02)
    assert float(x[1]) == pytest.approx(0.07, abs=0.01)
    assert all(later < earlier for earlier, later in zip(variances, variances[1:]))
    assert var[0] < var[1] < var[2]  # further ahead is less certain


def test_kalman_filter_is_elementwise_over_batch_and_positions():
    z = torch.tensor([[0.1, 0.5], [0.9, 0.3]])
    x, p = kalman_init(z, R)
    x, p = kalman_step(x, p, z + 0.1, Q, R)
    x1, p1 = kalman_init(z[1, 0], R)
    x1, p1 = kalman_step(x1, p1, z[1, 0] + 0.1, Q, R)
    assert torch.allclose(x[1, 0], x1) and torch.allclose(p[1, 0], p1)


def _run(strategy, calls):
    """Feed hand-made calls (probs, masked, stable) to one policy; return the last decision."""
    policy = parse_strategy(strategy)
    state = policy.init_state(1, 4, torch.device("cpu"))
    decision = None
    for t, (targets, confs, masked, stable) in enumerate(calls):
        view = make_view(peaked(targets, confs, V), masked=[masked], stable=[stable], block_step=t)
        decision = policy.decide(view, state)
    return decision


def _rising(left_settled: bool):
    # position 1 rises 0.3 -> 0.5 -> 0.7 with the same top-1; 2 and 3 sit at 0.8; 0 is decided, or
    # masked with a top-1 that changes at every call
    calls = []
    for t, conf in enumerate([0.3, 0.5, 0.7]):
        masked = [not left_settled, True, True, True]
        stable = [t + 1 if left_settled else 1, t + 1, t + 1, t + 1]
        targets = [2 + (0 if left_settled else t), 5, 6, 7]
        calls.append((targets, [0.5, conf, 0.8, 0.8], masked, stable))
    return calls


def test_lookahead_commits_a_rising_trajectory_early_when_the_left_context_is_settled():
    decision = _run("ce:tau=0.9,horizon=3,z=1", _rising(left_settled=True))
    assert decision.commit[0].tolist() == [False, True, False, False]
    assert decision.events["ce_lookahead"].tolist() == [1.0]
    # two calls in, the forecast is still too uncertain
    early = _run("ce:tau=0.9,horizon=3,z=1", _rising(left_settled=True)[:2])
    assert not bool(early.commit[0, 1])


def test_lookahead_waits_when_the_left_context_is_unsettled():
    decision = _run("ce:tau=0.9,horizon=3,z=1", _rising(left_settled=False))
    assert not bool(decision.commit[0, 1])
    assert decision.events["ce_lookahead"].tolist() == [0.0]
    assert decision.commit[0].tolist() == [False, False, True, False]  # progress: the most confident


def test_lookahead_off_does_not_commit_early():
    decision = _run("ce:tau=0.9,horizon=3,z=1,lookahead=false", _rising(left_settled=True))
    assert not bool(decision.commit[0, 1])


def _oscillating():
    # 0: same top-1, margin zigzags 0.95/0.6; 1: flat 0.6 then 0.95; 2: top-1 flips away and back
    # (changes at calls 3 and 4), 0.95 now; 3: one fresh change of top-1, 0.95 now
    calls = []
    for t in range(5):
        c0 = 0.95 if t % 2 == 0 else 0.6
        late = 0.95 if t == 4 else 0.6
        targets = [2, 3, 9 if t == 3 else 4, 5 if t < 4 else 10]
        stable = [t + 1, t + 1, [1, 2, 3, 1, 1][t], t + 1 if t < 4 else 1]
        calls.append((targets, [c0, late, late, late], [True] * 4, stable))
    return calls


def test_an_oscillating_position_is_held_back_although_it_clears_tau():
    decision = _run("ce:tau=0.9", _oscillating())
    # the zigzag (0) and the flip-flop (2) wait; a single fresh change (3) is not oscillation
    assert decision.commit[0].tolist() == [False, True, False, True]
    assert decision.events["ce_holds"].tolist() == [2.0]
    assert _run("ce:tau=0.9,hold=false", _oscillating()).commit[0].tolist() == [True, True, True, True]
    # flips=1 holds every fresh change of top-1 as well
    assert _run("ce:tau=0.9,flips=1", _oscillating()).commit[0].tolist() == [False, True, False, False]


def test_an_under_confident_position_is_held_even_if_the_base_rule_takes_it():
    calls = [([2, 3, 4, 5], [0.5, 0.6, 0.3, 0.3], [True] * 4, [t + 1] * 4) for t in range(2)]
    # margins here are about 0.45 and 0.56: with hold_margin 0.5 only the first is under-confident
    assert _run("ce:tau=0.4,hold_margin=0.5", calls).commit[0].tolist() == [False, True, False, False]
    assert _run("ce:tau=0.4", calls).commit[0].tolist() == [True, True, False, False]


def test_if_everything_is_held_the_step_still_commits_its_most_confident_position():
    calls = _oscillating()
    calls[-1] = ([2, 3, 4, 5], [0.95, 0.96, 0.95, 0.3], [True] * 4, [5, 5, 1, 5])
    decision = _run("ce:tau=0.9,hold_margin=0.99", calls)  # every margin is under-confident now
    assert decision.commit[0].tolist() == [False, True, False, False]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llada(gen_length=16, block_length=8, seed=1)


PROMPTS = ["hello world", "how many apples does tom have now ?", "print x"]


# the default never fires on this random model (confidences stay low); the others hold and look ahead
@pytest.mark.parametrize("strategy", ["ce", "ce:tau=0.3", "ce:tau=0.6,gamma=0.3,horizon=3,z=0"])
def test_ce_decodes_to_no_masks_and_is_batch_invariant(tiny, strategy):
    batch = generate(tiny, PROMPTS, strategy, gen_length=16, block_length=8)
    lookahead = holds = 0.0
    for prompt, seq in zip(PROMPTS, batch.sequences):
        assert tiny.mask_id not in seq.tokens
        alone = generate(tiny, [prompt], strategy, gen_length=16, block_length=8).sequences[0]
        assert alone.tokens == seq.tokens and alone.nfe == seq.nfe
        lookahead += seq.events["ce_lookahead"]
        holds += seq.events["ce_holds"]
    if strategy == "ce:tau=0.3":
        assert holds > 0
    if "gamma" in strategy:
        assert lookahead > 0
