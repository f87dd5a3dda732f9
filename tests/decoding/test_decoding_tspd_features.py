"""Trajectory features: hand-made trajectories with known answers, and online == offline on a real decode."""

import numpy as np
import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.features import (
    FEATURE_GROUPS,
    FEATURE_NAMES,
    HISTORY,
    STABILITY_CAP,
    FeatureTracker,
    feature_columns,
    controller_groups,
    loop_stability,
    trace_features,
    trace_samples,
)
from unmask.decoding.policies.threshold import Threshold, ThresholdConfig
from unmask.decoding.trace import Trace
from unmask.testing import make_view, peaked, tiny_llada

V = 12
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def hand_trace(top1, confidence, masked_before, block, margin=None):
    """A Trace from hand-written (steps, gen) arrays; tokens_after marks the last step's top-1 final."""
    top1 = np.asarray(top1, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float32)
    margin = confidence * 0.5 if margin is None else np.asarray(margin, dtype=np.float32)
    masked_before = np.asarray(masked_before, dtype=bool)
    tokens_after = np.where(masked_before, 0, top1)
    tokens_after[-1] = top1[-1]
    return Trace(
        top1=top1, confidence=confidence, margin=margin, entropy=1.0 - confidence, masked_before=masked_before,
        tokens_after=tokens_after, block=np.asarray(block, dtype=np.int64), commit_step=np.zeros(top1.shape[1], np.int64),
    )


def test_groups_partition_the_features_and_drop_removes_exactly_one_group():
    assert sorted(sum((list(v) for v in FEATURE_GROUPS.values()), [])) == sorted(FEATURE_NAMES)
    assert set(FEATURE_GROUPS) == {"confidence", "entropy", "momentum", "stability", "position"}
    # the paper names confidence, entropy, momentum and position; stability is only read on request
    assert controller_groups() == ("confidence", "entropy", "momentum", "position")
    assert controller_groups(stability=True) == ("confidence", "entropy", "momentum", "stability", "position")
    kept = [FEATURE_NAMES[i] for i in feature_columns(controller_groups("momentum", stability=True))]
    assert not any("delta" in name for name in kept)
    assert len(kept) == len(FEATURE_NAMES) - len(FEATURE_GROUPS["momentum"])
    assert controller_groups("momentum") == ("confidence", "entropy", "position")
    assert controller_groups("stability", stability=True) == controller_groups()
    with pytest.raises(ValueError, match="stability=true"):
        controller_groups("stability")
    with pytest.raises(ValueError, match="drop must be one of"):
        controller_groups("nonsense")


def test_momentum_sign_and_the_three_call_difference_on_a_rising_and_a_falling_trajectory():
    # one block of 2 positions over 5 calls: position 0 rises by 0.1 a call, position 1 falls by 0.15
    conf = np.array([[0.2 + 0.1 * t, 0.9 - 0.15 * t] for t in range(5)], dtype=np.float32)
    trace = hand_trace(np.ones((5, 2)), conf, np.ones((5, 2)), np.zeros(5))
    f = trace_features(trace, block_length=2).features
    assert f[0, :, COL["confidence_delta1"]] == pytest.approx([0, 0])  # no earlier call in the block
    assert f[1, 0, COL["confidence_delta1"]] == pytest.approx(0.1)
    assert f[1, 0, COL["confidence_delta3"]] == pytest.approx(0.1)  # reaches back to the block's first call only
    assert f[4, 0, COL["confidence_delta3"]] == pytest.approx(0.3)
    assert f[4, 1, COL["confidence_delta1"]] == pytest.approx(-0.15)
    assert f[4, 1, COL["confidence_delta3"]] == pytest.approx(-0.45)
    assert f[4, 1, COL["margin_delta3"]] == pytest.approx(-0.225)  # margin = conf / 2 here
    assert HISTORY == 3


def test_momentum_restarts_at_a_new_block():
    # gen 4, block 2: calls 0-1 in block 0, calls 2-3 in block 1 (positions 2, 3 had confidences before)
    conf = np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.8, 0.8], [0.9, 0.9, 0.9, 0.9]], np.float32)
    masked = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], bool)
    trace = hand_trace(np.ones((4, 4)), conf, masked, [0, 0, 1, 1])
    tf = trace_features(trace, block_length=2)
    assert tf.positions[2].tolist() == [2, 3] and tf.block_step.tolist() == [0, 1, 0, 1]
    assert tf.features[2, :, COL["confidence_delta1"]] == pytest.approx([0, 0])
    assert tf.features[3, 1, COL["confidence_delta1"]] == pytest.approx(0.1)
    assert tf.features[3, :, COL["block_progress"]] == pytest.approx([0.5, 0.5])


def test_stability_counts_and_the_flip_flag():
    top1 = np.array([[5, 7], [5, 7], [5, 8], [5, 8], [6, 8]])
    one_block = np.zeros(5, dtype=np.int64)
    assert loop_stability(top1, one_block)[:, 0].tolist() == [1, 2, 3, 4, 1]
    assert loop_stability(top1, one_block)[:, 1].tolist() == [1, 2, 1, 2, 3]
    # a new block at call 3 restarts every streak: position 0 (5, 5, 5 | 5, 6) -> 1, 2, 3 | 1, 1
    two_blocks = np.array([0, 0, 0, 1, 1])
    assert loop_stability(top1, two_blocks)[:, 0].tolist() == [1, 2, 3, 1, 1]
    assert loop_stability(top1, two_blocks)[:, 1].tolist() == [1, 2, 1, 1, 2]
    trace = hand_trace(top1, np.full((5, 2), 0.5), np.ones((5, 2)), np.zeros(5))
    f = trace_features(trace, block_length=2).features
    assert f[:, 0, COL["stability"]] * STABILITY_CAP == pytest.approx([1, 2, 3, 4, 1])
    # the first call has no previous prediction: stability 1 but no flip
    assert f[:, 0, COL["flipped"]].tolist() == [0, 0, 0, 0, 1]
    assert f[:, 1, COL["flipped"]].tolist() == [0, 0, 1, 0, 0]


def test_distances_to_the_nearest_decided_token_and_relative_positions():
    # one call, block of 6: decided at 1 and 4
    masked = np.array([[1, 0, 1, 1, 0, 1]], bool)
    trace = hand_trace(np.ones((1, 12)), np.full((1, 12), 0.5), np.ones((1, 12), bool), [1])
    trace.masked_before[0, 6:] = masked[0]
    f = trace_features(trace, block_length=6).features[0]  # block 1: positions 6..11
    L = 6
    # left: position 0 of the block sees the previous block (always decided) at distance 1
    assert f[:, COL["left_distance"]] * L == pytest.approx([1, 2, 1, 2, 3, 1])
    # right: none beyond position 4 in the block -> the cap (block length)
    assert f[:, COL["right_distance"]] * L == pytest.approx([1, 3, 2, 1, 6, 6])
    assert f[:, COL["block_offset"]] == pytest.approx(np.arange(6) / 5)
    assert f[:, COL["gen_offset"]] == pytest.approx((6 + np.arange(6)) / 11)


def test_online_tracker_on_hand_made_views_matches_the_hand_computation():
    tracker = FeatureTracker(window=3)
    state = tracker.init_state(1, 3, torch.device("cpu"))
    confs = [[0.3, 0.5, 0.2], [0.4, 0.3, 0.2], [0.6, 0.6, 0.2]]
    windows = None
    for t, conf in enumerate(confs):
        view = make_view(peaked([2, 3, 4], conf, V), masked=[[True, False, True]], stable=[[t + 1, 1, 1]], block_step=t)
        obs = tracker.update(view, state)
        windows = obs.windows
    f = obs.features[0]
    assert float(f[0, COL["confidence_delta1"]]) == pytest.approx(0.2, abs=1e-6)  # float32 arithmetic
    assert float(f[0, COL["confidence_delta3"]]) == pytest.approx(0.3, abs=1e-6)
    assert float(f[1, COL["confidence_delta1"]]) > 0 and float(f[2, COL["confidence_delta1"]]) == pytest.approx(0.0)
    assert float(f[0, COL["flipped"]]) == 0 and float(f[1, COL["flipped"]]) == 1
    assert float(f[0, COL["left_distance"]]) * 3 == pytest.approx(1) and float(f[2, COL["left_distance"]]) * 3 == pytest.approx(1)
    # window: this call, then the two before it, newest first
    assert windows[0, 0, :, COL["confidence"]].tolist() == pytest.approx([0.6, 0.4, 0.3])


class RecordingThreshold(Threshold):
    """The threshold rule, logging the features it would hand a controller at every call."""

    def __init__(self, tau: float):
        super().__init__(ThresholdConfig(tau=tau))
        self.tracker = FeatureTracker(window=3)
        self.log = []

    def init_state(self, batch_size, gen_length, device):
        return self.tracker.init_state(batch_size, gen_length, device)

    def decide(self, view, state):
        obs = self.tracker.update(view, state)
        self.log.append((view.rows.clone(), view.step, obs.features.clone(), obs.windows.clone(), view.masked.clone()))
        return super().decide(view, state)


@pytest.mark.parametrize("tau, cache, block_causal", [(0.25, "none", False), (0.9, "none", False), (0.25, "dual", False),
                                                       (0.25, "none", True), (0.25, "dual", True)])
def test_online_and_offline_features_agree_on_a_real_decode(tau, cache, block_causal):
    model = tiny_llada(gen_length=16, block_length=8, block_causal=block_causal)
    policy = RecordingThreshold(tau)
    prompts = ["hello world", "how many apples does tom have now ?"]
    result = generate(model, prompts, policy, gen_length=16, block_length=8, record_trace=True, early_stop=False,
                      cache=cache)
    # a block-diffusion prompt's tail opens the first block; the trace leaves it out and says how long it is
    leads = [s.trace.lead for s in result.sequences]
    if block_causal:
        assert all(lead == (len(s.prompt_ids)) % 8 for lead, s in zip(leads, result.sequences)) and any(leads)
        assert all(s.trace.top1.shape[1] == -(-(lead + 16) // 8) * 8 - lead for lead, s in zip(leads, result.sequences))
    else:
        assert leads == [0, 0]
    assert any(s.nfe < 16 for s in result.sequences) or tau == 0.9  # several commits per call happen at 0.25
    compared = 0
    for row, seq in enumerate(result.sequences):
        offline = trace_features(seq.trace, block_length=8)
        samples = trace_samples(seq.trace, block_length=8)
        online_windows = []
        for rows, step, features, windows, masked in policy.log:
            j = (rows == row).nonzero()
            if not len(j):
                continue
            j = int(j[0, 0])
            # the trace's own columns (a prompt tail's statistics are not recorded; it is never masked)
            mine = offline.positions[step] >= seq.trace.lead
            assert mine.sum() == 8 - (seq.trace.lead if offline.positions[step][0] == 0 else 0)
            np.testing.assert_allclose(features[j].numpy()[mine], offline.features[step][mine], rtol=1e-5, atol=1e-6)
            assert (masked[j].numpy() == offline.masked[step]).all()
            online_windows.append(windows[j][masked[j]])
            compared += 1
        # the training rows' windows (built from `prev` links) equal the windows the policy saw
        from unmask.training.controller import build_windows

        np.testing.assert_allclose(
            build_windows(samples.features, samples.prev, 3).numpy(), torch.cat(online_windows).numpy(), rtol=1e-5, atol=1e-6
        )
    assert compared == sum(s.nfe for s in result.sequences)
