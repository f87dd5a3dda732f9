"""TSPD's decision rule with a stub controller, controller lookup and checks, and whole decodes."""

import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.decoding.features import FEATURE_NAMES, controller_groups
from unmask.decoding.policies.tspd import TSPD, TSPDConfig
from unmask.errors import UnmaskError
from unmask.testing import make_view, peaked, tiny_llada
from unmask.training.controller import Controller, default_controller_dir

V = 12


class StubController:
    """P(converged) read from a fixed table (batch, block), whatever the features say."""

    groups = controller_groups()  # the paper's feature set, as tspd reads by default
    window = 2

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.seen = []

    def probability(self, windows):
        self.seen.append(windows.shape)
        return self.table[: windows.shape[0]]


def _decide(table, masked, tau=0.6, ce=False, conf_tau=None, confidences=(0.5,) * 5):
    controller = StubController(table)
    policy = TSPD(TSPDConfig(tau=tau, ce=ce, conf_tau=conf_tau), controller=controller)
    view = make_view(peaked([2, 3, 4, 5, 6], list(confidences), V), masked=masked)
    state = policy.init_state(1, 5, torch.device("cpu"))
    return policy.decide(view, state), controller


def test_tspd_commits_exactly_the_masked_positions_whose_probability_exceeds_tau():
    table = [[0.9, 0.61, 0.6, 0.2, 0.95]]
    decision, controller = _decide(table, [[True, True, True, True, False]])
    assert decision.commit[0].tolist() == [True, True, False, False, False]  # 0.6 is not > 0.6; 4 is decided
    assert controller.seen == [(1, 5, 2, len(FEATURE_NAMES))]  # window of 2 calls, every feature


def test_tspd_commits_the_most_probable_position_when_none_exceeds_tau():
    decision, _ = _decide([[0.1, 0.3, 0.2, 0.5, 0.99]], [[True, True, True, True, False]])
    assert decision.commit[0].tolist() == [False, False, False, True, False]


def test_conf_tau_adds_the_threshold_rule_to_the_controllers_commits():
    # controller (tau 0.6): only position 1 (0.7) clears it; confidence >= 0.9: positions 0 (0.95)
    # and 2 (0.92), and 4 (0.99) is decided already; position 3 clears neither (0.1, 0.3)
    table = [[0.2, 0.7, 0.1, 0.1, 0.1]]
    confidences = (0.95, 0.5, 0.92, 0.3, 0.99)
    masked = [[True, True, True, True, False]]
    paper, _ = _decide(table, masked, confidences=confidences)
    assert paper.commit[0].tolist() == [False, True, False, False, False]  # the paper's rule: the controller alone
    united, _ = _decide(table, masked, conf_tau=0.9, confidences=confidences)
    assert united.commit[0].tolist() == [True, True, True, False, False]
    # a confident position is committed even when the controller trusts nothing (no forced pick then)
    alone, _ = _decide([[0.1, 0.3, 0.2, 0.5, 0.1]], masked, conf_tau=0.9, confidences=confidences)
    assert alone.commit[0].tolist() == [True, False, True, False, False]


def test_tspd_with_ce_still_commits_at_least_one():
    decision, _ = _decide([[0.1, 0.3, 0.2, 0.5, 0.4]], [[True] * 5], ce=True)
    assert int(decision.commit[0].sum()) == 1


def _save_random_controller(folder, drop=None, window=2, stability=False):
    torch.manual_seed(0)
    controller = Controller(controller_groups(drop, stability), window=window, hidden=8)
    controller.set_normalisation(torch.rand(64, window, len(FEATURE_NAMES)))
    controller.save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return tiny_llada(gen_length=16, block_length=8, seed=2)


PROMPTS = ["hello world", "how many apples does tom have now ?", "print x"]


@pytest.fixture(scope="module")
def trained_controller(tiny, tmp_path_factory):
    """A controller fitted on this tiny model's own traces, and the median probability it gives them."""
    from unmask.training.controller import ControllerTrainConfig, build_windows, fit_controller
    from unmask.training.traces import collect

    train_prompts = ["the cat is here", "tom has 3 apples", "what is 2 + 2 ?", "sam gave ann a book", "x = 1", "how much"]
    data, _ = collect(tiny, train_prompts, gen_length=16, block_length=8)
    controller, _ = fit_controller(data, ControllerTrainConfig(arch="mlp", epochs=30, window=2, hidden=8, batch_size=256, progress=False))
    with torch.no_grad():
        median = float(controller.probability(build_windows(data.features, data.prev, 2)).median())
    return controller.save(tmp_path_factory.mktemp("controller")), median


@pytest.mark.parametrize("options", [",tau=MID", ",ce=true", ",tau=MID,ce=true", ",conf_tau=0.9", ",ce=true,conf_tau=0.9"])
def test_tspd_decodes_to_no_masks_and_is_batch_invariant(tiny, trained_controller, options):
    folder, median = trained_controller
    strategy = f"tspd:controller={folder}{options.replace('MID', f'{median:.4f}')}"
    batch = generate(tiny, PROMPTS, strategy, gen_length=16, block_length=8)
    for prompt, seq in zip(PROMPTS, batch.sequences):
        assert tiny.mask_id not in seq.tokens
        alone = generate(tiny, [prompt], strategy, gen_length=16, block_length=8).sequences[0]
        assert alone.tokens == seq.tokens and alone.nfe == seq.nfe
    if "MID" in options:
        assert any(seq.nfe < 16 for seq in batch.sequences)  # the controller committed several at once


def test_tspd_finds_the_controller_beside_the_model_and_checks_the_dropped_group(tiny, tmp_path):
    tiny.path = str(tmp_path)
    try:
        with pytest.raises(UnmaskError, match="controller"):
            generate(tiny, ["hello"], "tspd")
        _save_random_controller(default_controller_dir(tmp_path))
        _save_random_controller(default_controller_dir(tmp_path, "momentum"), drop="momentum")
        assert tiny.mask_id not in generate(tiny, ["hello"], "tspd").sequences[0].tokens
        assert tiny.mask_id not in generate(tiny, ["hello"], "tspd:drop=momentum").sequences[0].tokens
        # a controller trained with momentum cannot run the momentum ablation, and vice versa
        with pytest.raises(UnmaskError, match="drop"):
            generate(tiny, ["hello"], f"tspd:drop=momentum,controller={default_controller_dir(tmp_path)}")
        with pytest.raises(UnmaskError, match="drop"):
            generate(tiny, ["hello"], f"tspd:controller={default_controller_dir(tmp_path, 'momentum')}")
        # the stability departure reads its own folder; the paper's controller cannot stand in for it
        with pytest.raises(UnmaskError, match="controller"):
            generate(tiny, ["hello"], "tspd:stability=true")
        _save_random_controller(default_controller_dir(tmp_path, stability=True), stability=True)
        assert tiny.mask_id not in generate(tiny, ["hello"], "tspd:stability=true").sequences[0].tokens
        with pytest.raises(UnmaskError, match="stability"):
            generate(tiny, ["hello"], f"tspd:stability=true,controller={default_controller_dir(tmp_path)}")
        with pytest.raises(UnmaskError, match="stability"):
            generate(tiny, ["hello"], f"tspd:controller={default_controller_dir(tmp_path, stability=True)}")
    finally:
        tiny.path = None


def test_tspd_options_are_validated():
    with pytest.raises(UnmaskError, match="drop"):
        parse_strategy("tspd:drop=nonsense")
    with pytest.raises(UnmaskError, match="stability=true"):
        parse_strategy("tspd:drop=stability")  # the paper's controller has no stability group to drop
    assert parse_strategy("tspd:stability=true,drop=stability").params["drop"] == "stability"
    assert parse_strategy("tspd").params["stability"] is False  # the paper's features
    assert parse_strategy("learned_drafts").params["stability"] is True  # unmask's own policy reads them
    with pytest.raises(UnmaskError, match="tau"):
        parse_strategy("tspd:tau=1.5")
    assert parse_strategy("tspd:ce=true,tau=0.8").params["ce"] is True
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(UnmaskError, match="conf_tau"):
            parse_strategy(f"tspd:conf_tau={bad}")
    assert parse_strategy("tspd").params["conf_tau"] is None  # the paper's rule: the controller alone
    assert parse_strategy("tspd:conf_tau=0.9").params["conf_tau"] == 0.9


def test_a_malformed_controller_folder_is_a_clear_error(tiny, tmp_path):
    folder = _save_random_controller(tmp_path / "ctl")
    (folder / "controller.json").write_text("{not json")
    with pytest.raises(UnmaskError, match="unusable"):
        generate(tiny, ["hello"], f"tspd:controller={folder}")


def test_arch_picks_the_controller_folder_beside_the_model(tiny, tmp_path):
    from unmask.decoding.controller import RecurrentController

    assert default_controller_dir(tmp_path).name == "controller"  # the LSTM, the paper's
    assert default_controller_dir(tmp_path, None, "mlp").name == "controller-mlp"
    assert default_controller_dir(tmp_path, "momentum", "mlp").name == "controller-mlp-drop-momentum"
    assert default_controller_dir(tmp_path, "momentum").name == "controller-drop-momentum"
    assert default_controller_dir(tmp_path, stability=True).name == "controller-stability"
    assert default_controller_dir(tmp_path, "momentum", "mlp", True).name == "controller-mlp-stability-drop-momentum"
    _save_random_controller(default_controller_dir(tmp_path, None, "mlp"))
    torch.manual_seed(0)
    lstm = RecurrentController(controller_groups(), hidden=4)
    lstm.set_normalisation(torch.rand(64, len(FEATURE_NAMES)))
    lstm.save(default_controller_dir(tmp_path))
    tiny.path = str(tmp_path)
    try:
        for spec, kind in (("tspd", RecurrentController), ("tspd:arch=mlp", Controller), ("tspd:arch=lstm", RecurrentController)):
            policy = parse_strategy(spec)
            assert tiny.mask_id not in generate(tiny, ["hello"], policy).sequences[0].tokens
            assert type(policy.controller) is kind
    finally:
        tiny.path = None
    with pytest.raises(UnmaskError, match="arch"):
        parse_strategy("tspd:arch=gru")
