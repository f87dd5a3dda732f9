"""benchmarks/psd_divergence.py: which of PSD's commits made its answer differ from the greedy one."""


import pytest
import torch

from unmask.decoding import generate, parse_strategy
from unmask.testing import peaked, scripted_model, tiny_tokenizer, write_tiny_llada


@pytest.fixture(scope="module")
def script(load_benchmark):
    return load_benchmark("psd_divergence")


def test_the_recorder_tells_rule_commits_from_accepted_drafts(script):
    tok = tiny_tokenizer()
    vocab = len(tok.hf)
    target = [tok.token_id(w) for w in "tom has 5 apples and ann has 3".split()]
    conf = [0.95, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]

    def rule(row, gen_start):
        probs = torch.full((row.shape[0], vocab), 1.0 / vocab)
        probs[gen_start:] = peaked(target, conf, vocab)
        return probs

    model = scripted_model(rule, gen_length=8, block_length=8, tokenizer=tok)
    recorder = script.RecordingPSD(parse_strategy("psd:group=2,depth=3").config)
    generate(model, ["hello"], recorder)
    # call 1: the threshold rule commits position 0 (0.95); drafts G1 = {1, 2}, G2 = {3, 4},
    # G3 = {5, 6}, all consistent, so call 2 accepts depth 3; each group was confirmed by the
    # prediction on the shallower canvas, where these positions kept their probabilities
    assert 0 in recorder.rule_commits[0]
    assert sorted(recorder.confirmed[0]) == [1, 2, 3, 4, 5, 6]
    # (the loop removes the mask token, whose share (1 - c) / (V - 1) the others then split)
    def without_mask(c):
        return c / (1 - (1 - c) / (vocab - 1))

    assert recorder.confirmed[0][1] == pytest.approx(without_mask(0.5), abs=1e-4)
    assert recorder.confirmed[0][6] == pytest.approx(without_mask(0.25), abs=1e-4)
    # position 7 is left to the rule: the next step commits it (forced) from call 2's logits
    assert 7 in recorder.rule_commits[0]


def test_the_report_accounts_for_every_problem(script, tmp_path, capsys):
    path = write_tiny_llada(tmp_path / "tiny", gen_length=16, block_length=8)
    assert script.main(["--model", str(path), "--limit", "4", "--batch-size", "4", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "psd against low_confidence: 4 arith dev problems" in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    counts = report["counts"]
    differing = sum(v for k, v in counts.items() if k.split(" | ")[0] in ("unmasking rule", "accepted draft", "filled at stop"))
    assert counts.get("same answer", 0) + differing == 4


def test_a_strategy_that_is_not_psd_is_refused(script, capsys):
    assert script.main(["--strategy", "threshold"]) == 2
    assert "must be a psd setting" in capsys.readouterr().err
