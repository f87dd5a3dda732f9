"""TSPD controller: labels from traces, trace files, training, save/load, and the commands end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from unmask.decoding import generate
from unmask.decoding.features import FEATURE_NAMES
from unmask.errors import UnmaskError
from unmask.testing import peaked, scripted_model
from unmask.training.controller import (
    CONFIG_FILE,
    PLOT_FILE,
    WEIGHTS_FILE,
    ControllerTrainConfig,
    build_windows,
    class_weights,
    default_controller_dir,
    fit_controller,
    load_controller,
    plot_losses,
    split_by_sequence,
)
from unmask.training.controller_cli import add_controller_commands, run_controller_command
from unmask.training.traces import TraceData, collect, load_traces, save_traces


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


def test_labels_say_whether_the_top1_already_equals_the_final_token():
    model = _scripted()
    data, settings = collect(model, ["hello"], gen_length=4, block_length=4, early_stop=False)
    assert settings["block_length"] == 4 and "low_confidence" in settings["strategy"]
    got = {(int(s), int(p)): int(y) for s, p, y in zip(data.step, data.position, data.labels)}
    expected = {(t, g): int(t >= SWITCH[g]) for t in range(4) for g in range(t, 4)}
    assert got == expected
    # prev links each row to the same position one call earlier
    for i in np.flatnonzero(data.prev >= 0):
        j = data.prev[i]
        assert data.position[j] == data.position[i] and data.step[j] == data.step[i] - 1


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


FAST = dict(epochs=15, patience=5, batch_size=64, progress=False, hidden=16)


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
