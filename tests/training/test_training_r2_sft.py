"""Redundancy-aware SFT: the selection rule, the fine-tuning masks, and the pipeline end to end.

No scorer here always says "correct": the selection test scores with the arith task's own scorer,
and the end-to-end test with an exact-match scorer against gold answers, one of which the model
cannot write, so a selection that ignored the scorer would fail.
"""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import unmask.decoding as decoding
import unmask.tasks as tasks_module
from unmask.decoding.redundancy import r_total
from unmask.decoding.trace import Trace
from unmask.errors import UnmaskError
from unmask.training.r2_sft import R2SFTConfig, fine_tune_config, run_r2_sft, select_pairs

MASK, WORD = 99, 7


def waiting_trace(wait: int) -> Trace:
    """One position whose top-1 is its final token from the first call, left masked for `wait` calls.

    By the definition (unmask.decoding.redundancy): temporal = `wait` (calls 0..wait-1 leave it
    masked with top1 = final); one position has no window of 3 and no run of 2 -> spatial 0.
    So R_total = wait.
    """
    steps = wait + 1
    return Trace(
        top1=np.full((steps, 1), WORD), confidence=np.full((steps, 1), 0.5, dtype=np.float32),
        margin=np.zeros((steps, 1), dtype=np.float32), entropy=np.zeros((steps, 1), dtype=np.float32),
        masked_before=np.ones((steps, 1), dtype=bool),
        tokens_after=np.array([[MASK]] * wait + [[WORD]]), block=np.zeros(steps, dtype=np.int64),
        commit_step=np.array([wait]),
    )


def _fake_generate(plan):
    """generate() stand-in: plan[strategy] -> list of (text, wait, nfe, policy events) per prompt."""

    def generate(model, prompts, policy, **kw):
        assert kw.get("record_trace") is True  # R_total is read from the trace
        seqs = [SimpleNamespace(text=t, trace=waiting_trace(w), events=ev, nfe=n) for t, w, n, ev in plan[policy.describe()][: len(prompts)]]
        return SimpleNamespace(sequences=seqs)

    return generate


def test_waiting_trace_has_the_r_total_worked_by_hand():
    assert [r_total(waiting_trace(w)) for w in (0, 3, 9)] == [0.0, 3.0, 9.0]


def test_keeps_the_correct_candidate_with_the_lowest_trace_r_total_ties_to_fewer_calls(monkeypatch):
    from unmask.tasks import get_task

    task = get_task("arith")
    problems = task.problems("train", limit=3, seed=0)
    right = [f"the answer is {p.answer} ." for p in problems]
    wrong = "the answer is 999 ."
    a = decoding.parse_strategy("low_confidence").describe()
    b = decoding.parse_strategy("r2").describe()
    c = decoding.parse_strategy("threshold:tau=0.7").describe()
    none = {}
    plan = {
        # problem 1: a's own counters claim 50 redundant steps, c's claim 0; the traces say 5 and 7.
        # R_total is the trace's, so a wins; a rule reading the counters would pick c.
        a: [(right[0], 9, 40, none), (right[1], 5, 30, {"temporal_redundant_steps": 50.0}), (wrong, 0, 10, none)],
        # problem 0: b ties c at R_total 3 but r2's own events are no part of R_total; c has fewer calls
        b: [(right[0], 3, 20, {"cluster_commits": 4.0, "window_commits": 2.0}), (wrong, 1, 10, none), (wrong, 0, 5, none)],
        c: [(right[0], 3, 12, none), (right[1], 7, 10, {"temporal_redundant_steps": 0.0}), (wrong, 0, 5, none)],
    }
    monkeypatch.setattr(decoding, "generate", _fake_generate(plan))
    cfg = R2SFTConfig(tasks=("arith",), problems=3, candidates=("low_confidence", "r2", "threshold:tau=0.7"), progress=False)
    pairs, stats = select_pairs(None, cfg)
    assert [(p["strategy"], p["r_total"], p["nfe"]) for p in pairs] == [
        ("threshold:tau=0.7", 3.0, 12),  # ties with r2 on R_total, fewer calls
        ("low_confidence", 5.0, 30),  # lowest trace R_total among the correct ones
    ]  # problem 2: no candidate is correct (the arith scorer rejects 999) -> no pair
    assert stats["with_correct"] == 2 and stats["prompts"] == 3
    assert stats["candidates"]["r2"]["accuracy"] == pytest.approx(1 / 3)
    assert stats["candidates"]["r2"]["r_total"] == pytest.approx((3 + 1 + 0) / 3)
    # the policy's own events are reported beside R_total
    assert stats["candidates"]["r2"]["policy_events"]["cluster_commits"] == pytest.approx(4 / 3)


def test_select_working_also_asks_the_task_to_accept_the_working(monkeypatch):
    from unmask.tasks import get_task
    from unmask.tasks.arith import PEOPLE

    task = get_task("arith")
    problem = task.problems("train", limit=1, seed=0)[0]
    asked = problem.question.split()
    named = next(w for w in asked if w in PEOPLE)
    stranger = next(w for w in PEOPLE if w not in asked)
    a = decoding.parse_strategy("threshold:tau=0.7").describe()
    b = decoding.parse_strategy("r2").describe()
    plan = {  # both answers are right; a's working names someone the problem never mentions
        a: [(f"{stranger} has {problem.answer} . the answer is {problem.answer} .", 1, 10, {})],
        b: [(f"{named} has {problem.answer} . the answer is {problem.answer} .", 4, 12, {})],
    }
    monkeypatch.setattr(decoding, "generate", _fake_generate(plan))
    picks = {}
    for select in ("answer", "working"):
        cfg = R2SFTConfig(tasks=("arith",), problems=1, candidates=("threshold:tau=0.7", "r2"), select=select,
                          progress=False)
        pairs, stats = select_pairs(None, cfg)
        picks[select] = [p["strategy"] for p in pairs]
        assert stats["select"] == select
    assert picks == {"answer": ["threshold:tau=0.7"], "working": ["r2"]}  # lowest R_total, then the consistent one


def test_fine_tuning_masks_block_wise_at_the_decode_block_length_unless_told_uniform():
    model = SimpleNamespace(defaults=SimpleNamespace(gen_length=64, block_length=32))
    block = fine_tune_config(R2SFTConfig(), model, Path("pairs.jsonl"), Path("/nonexistent/model"))
    assert (block.block_frac, block.block_length, block.gen_length) == (1.0, 32, 64)
    uniform = fine_tune_config(R2SFTConfig(masking="uniform"), model, Path("pairs.jsonl"), Path("/nonexistent/model"))
    assert uniform.block_frac == 0.0


def test_the_cli_passes_the_masking_choice():
    from unmask.training.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["train", "r2-sft"]).masking == "block"
    assert parser.parse_args(["train", "r2-sft", "--masking", "uniform"]).masking == "uniform"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "r2-sft", "--masking", "random"])
    assert parser.parse_args(["train", "r2-sft"]).select == "answer"
    assert parser.parse_args(["train", "r2-sft", "--select", "working"]).select == "working"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "r2-sft", "--select", "all"])


class ExactMatch:
    """The arith task with an exact-match scorer against `gold` (problem id -> completion)."""

    def __init__(self, base, gold):
        self.base, self.gold = base, gold

    def __getattr__(self, name):
        return getattr(self.base, name)

    def score(self, problem, completion):
        return 1.0 if self.gold.get(problem.id) == completion else 0.0


def test_pipeline_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    from unmask.models import load_model

    real_get_task = tasks_module.get_task
    arith = real_get_task("arith")
    problems = arith.problems("train", limit=6, seed=0)
    model = load_model(tiny_checkpoint)
    prompts = [arith.messages(p) for p in problems]
    # gold: the model's own greedy low_confidence answers, except problem 0, which it cannot write
    reference = decoding.generate(model, prompts, "low_confidence", seed=0)
    gold = {p.id: s.text for p, s in zip(problems, reference.sequences)}
    gold[problems[0].id] = "\x00 an answer no decode writes"
    monkeypatch.setattr(tasks_module, "get_task", lambda name, **kw: ExactMatch(real_get_task(name, **kw), gold))

    out = tmp_path / "r2"
    result = run_r2_sft(R2SFTConfig(init=tiny_checkpoint, out=str(out), tasks=("arith",), problems=6,
                                    candidates=("low_confidence", "r2"), steps=4, batch_size=4, eval_every=2,
                                    eval_problems=3, warmup_steps=1, progress=False))
    pairs = [json.loads(line) for line in (out / "r2_pairs.jsonl").read_text().splitlines()]
    # problem 0 has no correct candidate; every other has at least low_confidence's own answer
    assert result["selection"]["with_correct"] == 5 and len(pairs) == 5
    assert [p["response"] for p in pairs] == [gold[p.id] for p in problems[1:]]
    # each pair is the correct candidate with the lowest (trace R_total, NFE)
    decodes = {spec: decoding.generate(model, prompts, spec, seed=0, record_trace=True).sequences
               for spec in ("low_confidence", "r2")}
    for i, pair in zip(range(1, 6), pairs):
        options = [(r_total(seqs[i].trace), seqs[i].nfe, spec) for spec, seqs in decodes.items() if seqs[i].text == gold[problems[i].id]]
        best = min(options)
        assert (pair["r_total"], pair["nfe"]) == best[:2]
    # the fine-tuning masked every row block-wise at the decode's block length (8 for this checkpoint)
    state = torch.load(out / "model" / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["config"]["block_frac"] == 1.0 and state["config"]["block_length"] == model.defaults.block_length == 8
    log = [json.loads(line) for line in (out / "model" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval" in r]
    assert evals and all({"nfe", "r_total"} <= set(r["eval_costs"]["arith"]) for r in evals)
    assert (out / "training_dynamics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "model" / "config.json").exists()


def test_bad_candidates_or_masking_fail_before_any_work():
    with pytest.raises(UnmaskError, match="unknown strategy"):
        run_r2_sft(R2SFTConfig(candidates=("nope",), progress=False))
    with pytest.raises(UnmaskError, match="masking"):
        run_r2_sft(R2SFTConfig(masking="random", progress=False))
    with pytest.raises(UnmaskError, match="select"):
        run_r2_sft(R2SFTConfig(select="all", progress=False))
