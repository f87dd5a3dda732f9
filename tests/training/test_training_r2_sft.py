"""Redundancy-aware SFT: the selection rule, and the pipeline end to end on a tiny checkpoint."""

import json
from types import SimpleNamespace

import pytest

import unmask.decoding as decoding
from unmask.errors import UnmaskError
from unmask.training.r2_sft import R2SFTConfig, run_r2_sft, select_pairs


def _fake_generate(plan):
    """generate() stand-in: plan[strategy name + params] -> list of (text, r_total events, nfe) per prompt."""

    def generate(model, prompts, policy, **kw):
        outs = plan[policy.describe()]
        seqs = [SimpleNamespace(text=t, events={"temporal_redundant_steps": r}, nfe=n) for t, r, n in outs[: len(prompts)]]
        return SimpleNamespace(sequences=seqs)

    return generate


def test_keeps_the_correct_candidate_with_the_lowest_r_total_ties_to_fewer_calls(monkeypatch):
    from unmask.tasks import get_task

    task = get_task("arith")
    problems = task.problems("train", limit=3, seed=0)
    right = [f"the answer is {p.answer} ." for p in problems]
    wrong = "the answer is 999 ."
    a = decoding.parse_strategy("low_confidence").describe()
    b = decoding.parse_strategy("r2").describe()
    c = decoding.parse_strategy("threshold:tau=0.7").describe()
    plan = {
        a: [(right[0], 9.0, 40), (right[1], 5.0, 30), (wrong, 0.0, 10)],
        b: [(right[0], 3.0, 20), (wrong, 1.0, 10), (wrong, 0.0, 5)],
        c: [(right[0], 3.0, 12), (right[1], 7.0, 10), (wrong, 0.0, 5)],
    }
    monkeypatch.setattr(decoding, "generate", _fake_generate(plan))
    cfg = R2SFTConfig(tasks=("arith",), problems=3, candidates=("low_confidence", "r2", "threshold:tau=0.7"), progress=False)
    pairs, stats = select_pairs(None, cfg)
    assert [(p["strategy"], p["r_total"], p["nfe"]) for p in pairs] == [
        ("threshold:tau=0.7", 3.0, 12),  # ties with r2 on R_total, fewer calls
        ("low_confidence", 5.0, 30),  # the only correct ones: lowest R_total wins
    ]
    assert stats["with_correct"] == 2 and stats["prompts"] == 3
    assert stats["candidates"]["r2"]["accuracy"] == pytest.approx(1 / 3)


def test_pipeline_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    from unmask.tasks.base import Task

    monkeypatch.setattr(Task, "score", lambda self, problem, completion: 1.0)  # every answer counts as correct
    out = tmp_path / "r2"
    result = run_r2_sft(R2SFTConfig(init=tiny_checkpoint, out=str(out), tasks=("arith",), problems=6,
                                    candidates=("low_confidence", "r2"), steps=4, batch_size=4, eval_every=2,
                                    eval_problems=3, warmup_steps=1, progress=False))
    pairs = [json.loads(line) for line in (out / "r2_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and all(p["strategy"] in ("low_confidence", "r2") for p in pairs)
    log = [json.loads(line) for line in (out / "model" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert evals and all({"nfe", "r_total"} <= set(r["eval_costs"]["arith"]) for r in evals)
    assert (out / "training_dynamics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "model" / "config.json").exists()
    assert result["selection"]["with_correct"] == 6


def test_bad_candidates_fail_before_any_work():
    with pytest.raises(UnmaskError, match="unknown strategy"):
        run_r2_sft(R2SFTConfig(candidates=("nope",), progress=False))
