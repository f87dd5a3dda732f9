"""TSPD controller: EGP and low-confidence labels from traces, trace files, training (MLP and LSTM),
save/load, and the commands end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.features import FEATURE_NAMES, STABILITY_CAP
from unmask.errors import UnmaskError
from unmask.testing import peaked, scripted_model, tiny_llada
from unmask.training.controller import (
    CONFIG_FILE,
    PLOT_FILE,
    WEIGHTS_FILE,
    Chains,
    Controller,
    ControllerTrainConfig,
    RecurrentController,
    build_windows,
    class_weights,
    default_controller_dir,
    fit_controller,
    load_controller,
    plot_losses,
    roc_auc,
    split_by_sequence,
)
from unmask.training.controller_cli import add_controller_commands, run_controller_command
from unmask.training.traces import (
    TraceData,
    collect,
    decode_with_traces,
    load_traces,
    samples_from_results,
    save_traces,
)


# ---------------------------------------------------------------------------------------------
# labels

TARGET = [20, 21, 22, 23]
WRONG = [30, 31, 32, 33]
SWITCH = [0, 0, 2, 1]  # position g predicts its final token once SWITCH[g] tokens are committed


def _scripted():
    holder = {}

    def rule(row, gen_start):
        mask_id = holder["model"].mask_id
        committed = int((row[gen_start:] != mask_id).sum())
        targets = [0] * gen_start + [TARGET[g] if committed >= SWITCH[g] else WRONG[g] for g in range(4)]
        # position g is less confident than g - 1, so one-token-per-call commits 0, 1, 2, 3 in order
        confs = [0.5] * gen_start + [0.9 - 0.1 * g for g in range(4)]
        return peaked(targets, confs, holder["model"].network.vocab_size)

    holder["model"] = scripted_model(rule, gen_length=4, block_length=4)
    return holder["model"]


def _labels(data) -> dict:
    return {(int(s), int(p)): int(y) for s, p, y in zip(data.step, data.position, data.labels)}


def test_low_confidence_labels_say_whether_the_top1_already_equals_the_final_token():
    model = _scripted()
    data, settings = collect(model, ["hello"], trajectory="low_confidence", gen_length=4, block_length=4, early_stop=False)
    assert settings["block_length"] == 4 and "low_confidence" in settings["strategy"]
    assert settings["trajectory"] == "low_confidence"
    # one token per call, in order 0, 1, 2, 3: position g is still masked at calls 0..g
    expected = {(t, g): int(t >= SWITCH[g]) for t in range(4) for g in range(t, 4)}
    assert _labels(data) == expected
    # prev links each row to the same position one call earlier
    for i in np.flatnonzero(data.prev >= 0):
        j = data.prev[i]
        assert data.position[j] == data.position[i] and data.step[j] == data.step[i] - 1


def test_egp_is_the_default_and_commits_every_position_that_already_agrees():
    # y* (the low-confidence reference) is TARGET. EGP call 0: nothing committed, so positions 0 and 1
    # (SWITCH 0) predict TARGET and are committed; 2 and 3 predict WRONG. Call 1: two committed, so 2
    # and 3 predict TARGET and are committed. Two calls; each row labelled by top-1 == TARGET.
    model = _scripted()
    sequences, settings = decode_with_traces(model, ["hello"], gen_length=4, block_length=4, early_stop=False)
    assert settings["trajectory"] == "egp" and settings["strategy"].startswith("oracle")
    assert sequences[0].tokens == TARGET and sequences[0].nfe == 2
    data, _ = collect(model, ["hello"], gen_length=4, block_length=4, early_stop=False)
    assert _labels(data) == {(0, 0): 1, (0, 1): 1, (0, 2): 0, (0, 3): 0, (1, 2): 1, (1, 3): 1}
    assert data.prev.tolist() == [-1, -1, -1, -1, 2, 3]


A, B, B0, B2, C = 20, 21, 31, 32, 22


def _forcing():
    """Three positions. 0 always predicts A (0.9) and 2 always C (0.5); 1 (0.8) predicts B once 0 is
    decided while 2 is masked, B0 while 0 is masked and B2 once 2 is decided.

    Reference (one per call, most confident first): 0 = A, then 1 sees 0 decided and 2 masked: B,
    then 2 = C; y* = A B C. EGP: call 0 commits 0 and 2 (their top-1 already equal y*), 1 says B0;
    call 1: 1 says B2 != B, nothing agrees, so 1 is forced to y* = B (label 0).
    """
    holder = {}

    def rule(row, gen_start):
        mask_id = holder["model"].mask_id
        decided = [int(t) != mask_id for t in row[gen_start:]]
        one = B if decided[0] and not decided[2] else (B0 if not decided[0] else B2)
        return peaked([0] * gen_start + [A, one, C], [0.5] * gen_start + [0.9, 0.8, 0.5],
                      holder["model"].network.vocab_size)

    holder["model"] = scripted_model(rule, gen_length=3, block_length=3)
    return holder["model"]


def test_egp_forces_the_final_token_when_no_position_agrees_and_labels_it_0():
    model = _forcing()
    reference = generate(model, ["hello"], "low_confidence", early_stop=False).sequences[0]
    assert reference.tokens == [A, B, C]
    sequences, _ = decode_with_traces(model, ["hello"], early_stop=False)
    seq = sequences[0]
    assert seq.tokens == [A, B, C] and seq.nfe == 2
    assert seq.trace.top1[1, 1] == B2 and seq.trace.commit_step.tolist() == [0, 1, 0]
    data = samples_from_results(sequences, block_length=3)
    assert _labels(data) == {(0, 0): 1, (0, 1): 0, (0, 2): 1, (1, 1): 0}
    # the low-confidence trajectory of the same model: three calls, labels by the same definition
    low, _ = collect(model, ["hello"], trajectory="low_confidence", early_stop=False)
    assert _labels(low) == {(0, 0): 1, (0, 1): 0, (0, 2): 1, (1, 1): 1, (1, 2): 1, (2, 2): 1}


EGP_PROMPTS = ["what is 2 plus 3 ?", "hello", "tom has 5 apples and ann has 7 pens . how many apples ?", "print x"]


@pytest.mark.parametrize("early_stop", [False, True])
def test_egp_traces_on_a_tiny_model_are_the_oracle_decode_and_every_label_is_top1_equals_final(early_stop):
    model = tiny_llada(gen_length=16, block_length=8, seed=3)
    kwargs = dict(gen_length=16, block_length=8, early_stop=early_stop)
    reference = generate(model, EGP_PROMPTS, "low_confidence", **kwargs)
    sequences, settings = decode_with_traces(model, EGP_PROMPTS, batch_size=3, **kwargs)
    assert settings["trajectory"] == "egp" and settings["block_length"] == 8
    data = samples_from_results(sequences, block_length=8)
    expected = {}
    several = forced = 0
    for index, (seq, ref) in enumerate(zip(sequences, reference.sequences)):
        y = np.asarray(ref.tokens)
        assert seq.tokens == ref.tokens  # EGP reproduces the reference's output y*
        tr = seq.trace
        assert tr.steps == seq.nfe
        for s in range(tr.steps):
            lo = int(tr.block[s]) * 8
            masked = tr.masked_before[s, lo : lo + 8]
            committed = masked & (tr.tokens_after[s, lo : lo + 8] != model.mask_id)
            agree = masked & (tr.top1[s, lo : lo + 8] == y[lo : lo + 8])
            # the oracle's rule: every agreeing masked position and nothing else, or one forced to y*
            if agree.any():
                assert np.array_equal(committed, agree), (index, s)
                several += int(committed.sum()) > 1
            else:
                assert int(committed.sum()) == 1, (index, s)
                forced += 1
            assert (tr.tokens_after[s, lo : lo + 8][committed] == y[lo : lo + 8][committed]).all()
            # one row per masked position of the current block, labelled top-1 == final token
            for i in np.flatnonzero(masked):
                expected[(index, s, lo + int(i))] = int(tr.top1[s, lo + i] == y[lo + i])
    got = {(int(q), int(s), int(p)): int(v) for q, s, p, v in zip(data.sequence, data.step, data.position, data.labels)}
    assert got == expected
    assert several > 0 and 0 < sum(expected.values()) < len(expected)  # not a vacuous check
    # under EGP a position's labels in its block are 0s ending in at most one 1, the call it is committed
    for i in np.flatnonzero(data.labels == 1):
        assert not (data.prev == i).any()
    # so a positive row never carries a streak: its top-1 was not final at the call before (or there
    # was none), and a top-1 unchanged for 2 calls or more is always labelled 0. This is why the
    # stability features are a departure (`--stability`): on EGP traces they give the label away.
    streak = np.round(data.features[:, FEATURE_NAMES.index("stability")] * STABILITY_CAP)
    assert (streak[data.labels == 1] == 1).all()
    settled = streak >= 2
    assert settled.any() and (data.labels[settled] == 0).all()
    # and after a position's first call in its block, a positive row is always a flip
    flipped = data.features[:, FEATURE_NAMES.index("flipped")] == 1
    later_positive = (data.prev >= 0) & (data.labels == 1)
    assert later_positive.any() and flipped[later_positive].all()
    # collect() gives the same rows
    again, _ = collect(model, EGP_PROMPTS, batch_size=3, **kwargs)
    np.testing.assert_array_equal(again.labels, data.labels)
    np.testing.assert_array_equal(again.features, data.features)


def test_trace_files_round_trip_and_concatenate(tmp_path):
    model = _scripted()
    data, settings = collect(model, ["hello", "hi there"], gen_length=4, block_length=2, early_stop=False)
    a = save_traces(tmp_path / "a.npz", data, {"model": "scripted", "model_path": None, **settings})
    b = save_traces(tmp_path / "b", data, {"model": "scripted", "model_path": None, **settings})
    assert b.suffix == ".npz"
    one = load_traces(a)
    np.testing.assert_array_equal(one.features, data.features)
    np.testing.assert_array_equal(one.prev, data.prev)
    assert one.meta[0]["rows"] == len(data) and one.meta[0]["block_length"] == 2
    both = load_traces([a, b])
    n = len(data)
    assert len(both) == 2 * n
    np.testing.assert_array_equal(both.prev[n:], np.where(data.prev >= 0, data.prev + n, -1))
    assert set(both.sequence[n:]) == {2, 3}
    raw = np.load(a)
    assert [str(x) for x in raw["feature_names"]] == list(FEATURE_NAMES)
    assert raw["group_index"].shape == (len(FEATURE_NAMES),)
    with pytest.raises(UnmaskError, match="no trace file"):
        load_traces(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------
# training on a synthetic dataset the controller can separate


def _synthetic(n_seq=24, per_seq=80, seed=0) -> TraceData:
    rng = np.random.default_rng(seed)
    n = n_seq * per_seq
    features = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0.3).astype(np.uint8)  # confidence and margin decide
    sequence = np.repeat(np.arange(n_seq), per_seq).astype(np.int32)
    prev = np.arange(n) - 1
    prev[np.arange(0, n, per_seq)] = -1
    zeros = np.zeros(n, np.int32)
    return TraceData(features, labels, prev.astype(np.int64), sequence, zeros, zeros)


FAST = dict(arch="mlp", epochs=15, patience=5, batch_size=64, progress=False, hidden=16)


def test_the_controller_learns_a_separable_rule_and_validation_loss_falls():
    controller, record = fit_controller(_synthetic(), ControllerTrainConfig(**FAST))
    val = record["history"]["val_loss"]
    assert record["val_loss"] < 0.6 * val[0]
    assert min(val) == record["val_loss"]
    assert record["val_metrics"]["accuracy"] > 0.9
    assert 500 < sum(p.numel() for p in controller.parameters()) < 5000
    # inverse class frequency on the training split
    assert record["class_weights"]["w1"] > record["class_weights"]["w0"]  # positives are the rarer class here


def test_a_controller_without_the_confidence_group_cannot_see_the_rule():
    _, record = fit_controller(_synthetic(), ControllerTrainConfig(drop="confidence", **FAST))
    assert record["val_metrics"]["accuracy"] < 0.75


def test_the_lstm_learns_the_same_rule_with_about_2k_parameters():
    data = _synthetic()
    rows = np.arange(len(data))
    data.prev = np.where(rows % 8 == 0, -1, rows - 1)  # sequences of 8 calls
    controller, record = fit_controller(data, ControllerTrainConfig(**{**FAST, "hidden": None, "arch": "lstm"}))
    assert isinstance(controller, RecurrentController) and controller.hidden == 16
    assert 1500 < sum(p.numel() for p in controller.parameters()) < 2500
    assert record["val_loss"] < 0.6 * record["history"]["val_loss"][0]
    assert record["val_metrics"]["accuracy"] > 0.9 and record["val_metrics"]["auc"] > 0.95


def _remembered(n_seq=240, length=6, seed=1) -> TraceData:
    """Sequences whose label, at every call, is the sign of feature 0 at the sequence's first call."""
    rng = np.random.default_rng(seed)
    n = n_seq * length
    features = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    first = np.repeat(np.arange(0, n, length), length)
    labels = (features[first, 0] > 0).astype(np.uint8)
    prev = np.arange(n) - 1
    prev[np.arange(0, n, length)] = -1
    sequence = np.repeat(np.arange(n_seq // 4), 4 * length).astype(np.int32)
    zeros = np.zeros(n, np.int32)
    return TraceData(features, labels, prev.astype(np.int64), sequence, zeros, zeros)


def test_only_the_lstm_remembers_calls_older_than_the_window():
    data = _remembered()
    config = dict(epochs=25, patience=25, batch_size=96, progress=False, val_fraction=0.25, lr=1e-2)
    _, lstm = fit_controller(data, ControllerTrainConfig(arch="lstm", **config))
    _, mlp = fit_controller(data, ControllerTrainConfig(arch="mlp", window=2, hidden=16, **config))
    # the MLP sees the first call only at the first two calls of each sequence of 6 (0.93 and 0.61 when written)
    assert lstm["val_metrics"]["accuracy"] > 0.85
    assert mlp["val_metrics"]["accuracy"] < 0.75


def test_chains_follow_prev_links_and_the_lstm_row_logits_step_through_them():
    prev = np.array([-1, -1, 0, 1, 2, -1, 5])
    features = torch.randn(7, len(FEATURE_NAMES))
    chains = Chains(features, prev)
    assert chains.chain.tolist() == [0, 1, 0, 1, 0, 2, 2] and chains.depth.tolist() == [0, 0, 1, 1, 2, 0, 1]
    assert chains.length.tolist() == [3, 2, 2]
    padded = chains.padded()
    assert torch.equal(padded[0], features[[0, 2, 4]]) and torch.equal(padded[1, :2], features[[1, 3]])
    assert not padded[1, 2].any()
    torch.manual_seed(0)
    controller = RecurrentController(hidden=4)
    controller.set_normalisation(torch.randn(32, len(FEATURE_NAMES)))
    with torch.no_grad():
        rows = controller.row_logits(features, prev)
        state = controller.initial_state((1,))
        by_hand = []
        for i in (0, 2, 4):  # chain 0, one call at a time
            logit, state = controller.step(features[i : i + 1], state)
            by_hand.append(float(logit))
    assert rows[[0, 2, 4]].tolist() == pytest.approx(by_hand, abs=1e-6)
    with pytest.raises(UnmaskError, match="malformed"):
        Chains(features[:3], np.array([-1, 0, 0]))


def test_roc_auc_against_pair_counting():
    rng = np.random.default_rng(0)
    prob = torch.from_numpy(rng.integers(0, 5, 60) / 4.0)  # many ties
    labels = torch.from_numpy(rng.integers(0, 2, 60)).float()
    pos, neg = prob[labels > 0.5], prob[labels < 0.5]
    pairs = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert roc_auc(prob, labels) == pytest.approx(float(pairs))


def test_class_weights_and_the_split_keep_whole_decodes_apart():
    w0, w1 = class_weights(np.array([1, 0, 0, 0]))
    assert (w0, w1) == pytest.approx((4 / 6, 2.0))
    sequence = np.repeat(np.arange(10), 5)
    train, val = split_by_sequence(sequence, 0.2, seed=0)
    assert val.sum() == 10 and not set(sequence[train]) & set(sequence[val])
    with pytest.raises(UnmaskError, match="all positive"):
        class_weights(np.ones(5))


def test_windows_follow_prev_links_and_repeat_the_oldest_call():
    features = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, len(FEATURE_NAMES))
    windows = build_windows(features, np.array([-1, 0, 1, -1]), window=3)
    assert windows[:, :, 0].tolist() == [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 3, 3]]


def test_save_and_load_round_trip(tmp_path):
    data = _synthetic(n_seq=6)
    controller, record = fit_controller(data, ControllerTrainConfig(**{**FAST, "epochs": 2}))
    controller.save(tmp_path / "ctl", extra={"val_loss": record["val_loss"]})
    plot_losses(record["history"], tmp_path / "ctl" / PLOT_FILE)
    loaded, config = load_controller(tmp_path / "ctl")
    windows = build_windows(data.features, data.prev, controller.window)
    with torch.no_grad():
        assert torch.equal(loaded.probability(windows), controller.probability(windows))
    assert config["groups"] == list(controller.groups) and config["val_loss"] == record["val_loss"]
    assert (tmp_path / "ctl" / PLOT_FILE).stat().st_size > 1000
    with pytest.raises(UnmaskError, match="no TSPD controller"):
        load_controller(tmp_path / "nowhere")


def test_lstm_save_and_load_round_trip_and_old_mlp_folders_still_load(tmp_path):
    data = _synthetic(n_seq=6)
    controller, record = fit_controller(data, ControllerTrainConfig(**{**FAST, "epochs": 2, "hidden": None, "arch": "lstm"}))
    controller.save(tmp_path / "lstm", extra={"val_loss": record["val_loss"]})
    loaded, config = load_controller(tmp_path / "lstm")
    assert isinstance(loaded, RecurrentController) and config["arch"] == "lstm" and config["hidden"] == 16
    with torch.no_grad():
        assert torch.equal(loaded.row_logits(data.features, data.prev), controller.row_logits(data.features, data.prev))
    # a folder written before `arch` existed is an MLP
    mlp, _ = fit_controller(data, ControllerTrainConfig(**{**FAST, "epochs": 1}))
    mlp.save(tmp_path / "old")
    old = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    del old["arch"]
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(old))
    loaded, _ = load_controller(tmp_path / "old")
    assert isinstance(loaded, Controller) and loaded.arch == "mlp"
    old["arch"] = "transformer"
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(old))
    with pytest.raises(UnmaskError, match="unusable"):
        load_controller(tmp_path / "old")


# ---------------------------------------------------------------------------------------------
# the commands on a tiny checkpoint, then decoding with what they wrote


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train")
    add_controller_commands(train.add_subparsers(dest="train_command"))
    return parser.parse_args(["train", *argv])


def test_collect_train_and_decode_end_to_end(tmp_path, capsys):
    from unmask.models import load_model
    from unmask.testing import write_tiny_llada

    model_dir = write_tiny_llada(tmp_path / "model", gen_length=16, block_length=8)
    traces = tmp_path / "traces.npz"
    code = run_controller_command(_parse([
        "collect-traces", "--model", str(model_dir), "--task", "arith:train_size=40,trace:train_size=40", "--n", "4",
        "--batch-size", "8", "--out", str(traces), "--device", "cpu", "--no-progress",
    ]))
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sequences"] == 8 and summary["rows"] > 0
    meta = load_traces(traces).meta[0]
    assert meta["task"] == "arith:train_size=40,trace:train_size=40" and meta["n"] == 4
    assert meta["model_path"] == str(model_dir) and meta["gen_length"] == 16 and meta["block_length"] == 8
    assert meta["trajectory"] == "egp" and meta["strategy"].startswith("oracle")

    code = run_controller_command(_parse(["controller", "--traces", str(traces), "--epochs", "3", "--no-progress"]))
    assert code == 0
    out = default_controller_dir(model_dir)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    for name in (WEIGHTS_FILE, CONFIG_FILE, PLOT_FILE):
        assert (out / name).exists()
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["trained_on"][0]["model_path"] == str(model_dir) and len(config["history"]["val_loss"]) <= 3

    model = load_model(str(model_dir), device="cpu")
    for strategy in ("tspd", "tspd:ce=true,tau=0.5"):
        result = generate(model, ["tom has 3 apples", "print x"], strategy)
        assert all(model.mask_id not in seq.tokens for seq in result.sequences)

    # the ablation needs its own controller, written beside the first one
    run_controller_command(_parse(["controller", "--traces", str(traces), "--epochs", "1", "--drop", "momentum",
                                   "--no-progress", "--no-plot"]))
    assert (default_controller_dir(model_dir, "momentum") / WEIGHTS_FILE).exists()
    result = generate(model, ["print x"], "tspd:drop=momentum")
    assert model.mask_id not in result.sequences[0].tokens

    # the LSTM controller, trained on low_confidence trajectories for a change, into a folder of its own
    low = tmp_path / "low.npz"
    run_controller_command(_parse([
        "collect-traces", "--model", str(model_dir), "--task", "arith:train_size=40", "--n", "4",
        "--trajectory", "low_confidence", "--out", str(low), "--device", "cpu", "--no-progress",
    ]))
    capsys.readouterr()
    assert load_traces(low).meta[0]["trajectory"] == "low_confidence"
    run_controller_command(_parse(["controller", "--traces", str(low), "--traces", str(traces), "--arch", "lstm",
                                   "--epochs", "2", "--out", str(tmp_path / "lstm"), "--no-progress", "--no-plot"]))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["arch"] == "lstm" and 1500 < summary["parameters"] < 2500
    config = json.loads((tmp_path / "lstm" / CONFIG_FILE).read_text())
    assert config["arch"] == "lstm" and config["training"]["hidden"] == 16
    assert [t["trajectory"] for t in config["trained_on"]] == ["low_confidence", "egp"]
    result = generate(model, ["tom has 3 apples", "print x"], f"tspd:controller={tmp_path / 'lstm'},ce=true")
    assert all(model.mask_id not in seq.tokens for seq in result.sequences)


def test_controller_needs_out_when_the_traces_name_no_model_folder(tmp_path):
    model = _scripted()
    data, settings = collect(model, ["hello", "hi"], gen_length=4, block_length=4)
    path = save_traces(tmp_path / "t.npz", data, {"model": "scripted", "model_path": None, **settings})
    with pytest.raises(UnmaskError, match="--out"):
        run_controller_command(_parse(["controller", "--traces", str(path), "--no-progress"]))


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(UnmaskError, match="no trace file"):
        run_controller_command(_parse(["controller", "--traces", str(tmp_path / "none.npz"), "--out", str(tmp_path)]))
    with pytest.raises(UnmaskError, match="unknown task"):
        run_controller_command(_parse(["collect-traces", "--task", "nope", "--out", str(tmp_path / "x.npz")]))
    with pytest.raises(SystemExit):
        _parse(["controller", "--traces", "x.npz", "--drop", "nonsense"])
    with pytest.raises(SystemExit):
        _parse(["controller", "--traces", "x.npz", "--arch", "transformer"])
    with pytest.raises(SystemExit):
        _parse(["collect-traces", "--out", "x.npz", "--trajectory", "random"])
    with pytest.raises(UnmaskError, match="trajectory"):
        collect(_scripted(), ["hello"], trajectory="random")
