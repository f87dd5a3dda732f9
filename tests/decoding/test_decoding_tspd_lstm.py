"""TSPD with the recurrent (LSTM) controller: the probabilities it computes online, one LSTM step per
call on a hidden state kept per (row, position), equal the ones computed offline from the recorded
trace (sequences built from the trace rows' `prev` links), and the state resets at a block's start."""

import numpy as np
import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.features import FEATURE_NAMES, trace_samples
from unmask.decoding.policies.tspd import TSPD, TSPDConfig
from unmask.testing import make_view, peaked, tiny_llada
from unmask.training.controller import ControllerTrainConfig, RecurrentController, fit_controller, load_controller
from unmask.training.traces import collect

V = 12
GEN, BLOCK = 16, 8


class RecordingTSPD(TSPD):
    """TSPD, logging the probability of every block position at every call."""

    def __init__(self, config, controller):
        super().__init__(config, controller=controller)
        self.log = []

    def controller_probability(self, view, state, observation):
        prob = super().controller_probability(view, state, observation)
        self.log.append((view.rows.clone(), view.step, prob.clone(), view.masked.clone()))
        return prob


@pytest.fixture(scope="module")
def tiny():
    return tiny_llada(gen_length=GEN, block_length=BLOCK, seed=2)


@pytest.fixture(scope="module")
def lstm(tiny, tmp_path_factory):
    """An LSTM controller fitted on this tiny model's EGP traces (saved and loaded back), and the
    median probability it gives those rows (a tau at which several positions commit per call)."""
    prompts = ["the cat is here", "tom has 3 apples", "what is 2 + 2 ?", "sam gave ann a book", "x = 1", "how much"]
    data, settings = collect(tiny, prompts, gen_length=GEN, block_length=BLOCK)
    assert settings["trajectory"] == "egp"
    controller, _ = fit_controller(data, ControllerTrainConfig(arch="lstm", epochs=8, batch_size=128, progress=False))
    folder = controller.save(tmp_path_factory.mktemp("lstm"))
    controller, _ = load_controller(folder)
    assert isinstance(controller, RecurrentController)
    with torch.no_grad():
        median = float(torch.sigmoid(controller.row_logits(data.features, data.prev)).median())
    return controller, median


PROMPTS = ["hello world", "how many apples does tom have now ?", "print x"]


@pytest.mark.parametrize("ce, cache", [(False, "none"), (True, "none"), (False, "dual")])
def test_online_lstm_probabilities_equal_the_offline_ones_from_the_trace(tiny, lstm, ce, cache):
    controller, median = lstm
    policy = RecordingTSPD(TSPDConfig(tau=median, ce=ce), controller)
    result = generate(tiny, PROMPTS, policy, gen_length=GEN, block_length=BLOCK, record_trace=True, early_stop=False,
                      cache=cache)
    assert any(seq.nfe < GEN for seq in result.sequences)  # several commits per call: sequences of varied length
    compared = deep = 0
    for row, seq in enumerate(result.sequences):
        samples = trace_samples(seq.trace, block_length=BLOCK)
        with torch.no_grad():
            offline = torch.sigmoid(controller.row_logits(samples.features, samples.prev)).numpy()
        online, steps = [], []
        for rows, step, prob, masked in policy.log:
            j = (rows == row).nonzero()
            if not len(j):
                continue
            j = int(j[0, 0])
            online.append(prob[j][masked[j]])
            steps.append(np.full(int(masked[j].sum()), step))
            compared += 1
        # the trace's rows are ordered by call, then position: the same order as the log
        np.testing.assert_array_equal(np.concatenate(steps), samples.step)
        np.testing.assert_allclose(torch.cat(online).numpy(), offline, rtol=1e-5, atol=1e-6)
        linked = samples.prev >= 0
        deep += int(linked[samples.prev[linked]].sum())
    assert compared == sum(seq.nfe for seq in result.sequences)
    assert deep > 0  # some rows are the third call or later of their position: the state was carried


def test_tspd_with_the_lstm_is_batch_invariant(tiny, lstm):
    controller, median = lstm
    batch = generate(tiny, PROMPTS, TSPD(TSPDConfig(tau=median), controller=controller), gen_length=GEN, block_length=BLOCK)
    for prompt, seq in zip(PROMPTS, batch.sequences):
        assert tiny.mask_id not in seq.tokens
        alone = generate(tiny, [prompt], TSPD(TSPDConfig(tau=median), controller=controller),
                         gen_length=GEN, block_length=BLOCK).sequences[0]
        assert alone.tokens == seq.tokens and alone.nfe == seq.nfe


def test_the_hidden_state_resets_at_a_block_start_and_advances_once_per_call():
    torch.manual_seed(0)
    controller = RecurrentController(hidden=4)
    controller.set_normalisation(torch.randn(64, len(FEATURE_NAMES)))
    policy = RecordingTSPD(TSPDConfig(tau=0.5), controller)
    state = policy.init_state(1, 3, torch.device("cpu"))
    assert state["controller"]["h"].shape == (1, 3, 4) and not state["controller"]["h"].any()

    def view(block_step, stable):
        # the same confidences at every call, so a call's features depend only on block_step and stable
        return make_view(peaked([2, 3, 4], [0.6, 0.3, 0.5], V), masked=[[True, True, False]], stable=[stable],
                         block_step=block_step)

    policy.decide(view(0, [1, 1, 1]), state)
    first, h_first = policy.log[-1][2][0], state["controller"]["h"].clone()
    policy.decide(view(1, [2, 2, 2]), state)
    second = policy.log[-1][2][0]
    assert not torch.allclose(state["controller"]["h"], h_first)  # every block position advanced, decided or not
    # by hand: two cell steps from a zero state on the features a fresh tracker computes
    tracker_state = policy.tracker.init_state(1, 3, torch.device("cpu"))
    manual = controller.initial_state((1, 3))
    with torch.no_grad():
        for expected, (block_step, stable) in zip((first, second), ((0, [1, 1, 1]), (1, [2, 2, 2]))):
            features = policy.tracker.update(view(block_step, stable), tracker_state).features
            logits, manual = controller.step(features, manual)
            assert torch.allclose(torch.sigmoid(logits)[0], expected)
    # a call at block_step 0 starts from a zero state again (the first call's input gives its output)
    policy.decide(view(0, [1, 1, 1]), state)
    assert torch.allclose(policy.log[-1][2][0], first) and torch.allclose(state["controller"]["h"], h_first)
