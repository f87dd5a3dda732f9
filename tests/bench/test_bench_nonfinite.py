"""A decode that meets NaN logits fails the bench clearly and keeps the problems already finished."""

import json

import pytest

import unmask.bench.runner as runner
from unmask.bench import BenchConfig, run_bench
from unmask.errors import NonFiniteLogitsError, UnmaskError


def _lines(out):
    return [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()[1:]]


def test_nan_logits_fail_the_bench_naming_the_problem_and_keep_finished_ones(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = BenchConfig(model=tiny_checkpoint, task="arith", limit=6, batch_size=3, out=str(tmp_path),
                      strategies=["low_confidence"])
    real = runner.generate
    calls = {"n": 0}
    chunks = []

    def nan_in_the_second_chunk(model, prompts, *args, **kwargs):
        calls["n"] += 1
        chunks.append(prompts)
        if calls["n"] == 2:  # the loop's error for the chunk's row 1: 2 bad positions at its call 3
            raise NonFiniteLogitsError({1: (2, 16, 3, 0)}, 2)
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "generate", nan_in_the_second_chunk)
    with pytest.raises(UnmaskError) as info:
        run_bench(cfg, progress=False)
    message = str(info.value)
    problems = runner.prepare(cfg)[2]
    second = problems[4]  # row 1 of the second chunk (problems 3, 4, 5)
    policy = runner.parse_strategy("low_confidence")
    key = runner.strategy_key(policy.name, policy.params)
    assert message.startswith(f"the model returned NaN or infinite logits for problem {second.id} under {key} "
                              "at its model call 3 (block 1 of 2): 2 of 16 generation positions;")
    assert "try --dtype fp32" in message and "\n" not in message
    assert message.endswith(f"the 3 problem results finished before it are kept in {tmp_path / 'problems.jsonl'} "
                            "and the same command resumes from them")
    assert [r["problem_id"] for r in _lines(tmp_path)] == [p.id for p in problems[:3]]
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setattr(runner, "generate", real)  # the fix (say --dtype fp32): the rerun decodes only the rest
    results = run_bench(cfg, progress=False)
    assert [r["problem_id"] for r in _lines(tmp_path)] == [p.id for p in problems]
    assert results["rows"][0]["n"] == 6
