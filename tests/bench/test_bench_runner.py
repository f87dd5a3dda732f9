import json

import pytest

import unmask.bench.runner as runner
from unmask.bench import BenchConfig, run_bench
from unmask.errors import UnmaskError

CONTRACT_TOP = {"model", "task", "split", "device", "limit", "seed", "rows"}
CONTRACT_ROW = {"strategy", "params", "n", "accuracy", "accuracy_ci", "nfe", "rows", "tpf", "useful_tokens", "tokens_per_s", "latency_s"}


def _cfg(tiny_checkpoint, out, **kw):
    base = dict(model=tiny_checkpoint, task="arith", limit=6, batch_size=3, out=str(out),
                strategies=["low_confidence", "threshold:tau=0.5", "oracle"])
    base.update(kw)
    return BenchConfig(**base)


def _problem_lines(out):
    lines = (out / "problems.jsonl").read_text().splitlines()[1:]
    return [json.loads(line) for line in lines]


def test_writes_the_three_files_with_contract_fields(tiny_checkpoint, tmp_path):
    results = run_bench(_cfg(tiny_checkpoint, tmp_path), progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert CONTRACT_TOP <= set(on_disk)
    assert [r["strategy"] for r in on_disk["rows"]] == ["low_confidence", "threshold", "oracle"]
    for row in on_disk["rows"]:
        assert CONTRACT_ROW <= set(row)
        assert row["n"] == 6
        lo, hi = row["accuracy_ci"]
        assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0
        assert row["tpf"] == pytest.approx(16 / row["nfe"], rel=1e-6)
        assert 0.0 < row["policy_time_frac"] < 1.0
    assert on_disk["rows"][1]["params"]["tau"] == 0.5
    assert on_disk["rows"][0]["nfe"] == 16  # one token per step over gen_length 16
    md = (tmp_path / "results.md").read_text()
    assert "threshold:tau=0.5" in md and "oracle" in md
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_batch_size_does_not_change_any_token(tiny_checkpoint, tmp_path):
    run_bench(_cfg(tiny_checkpoint, tmp_path / "b1", batch_size=1), progress=False)
    run_bench(_cfg(tiny_checkpoint, tmp_path / "b4", batch_size=4), progress=False)
    one = {(r["key"], r["problem_id"]): (r["text"], r["nfe"]) for r in _problem_lines(tmp_path / "b1")}
    four = {(r["key"], r["problem_id"]): (r["text"], r["nfe"]) for r in _problem_lines(tmp_path / "b4")}
    assert one == four and len(one) == 18


def test_interrupted_run_resumes_without_recomputing_or_duplicating(tiny_checkpoint, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = runner.generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th batch: low_confidence done (2 batches), threshold half done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_cfg(tiny_checkpoint, tmp_path / "r"), progress=False)
    assert len(_problem_lines(tmp_path / "r")) == 9  # 6 low_confidence + 3 threshold

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", counting)
    resumed = run_bench(_cfg(tiny_checkpoint, tmp_path / "r"), progress=False)
    assert counted["n"] == 3  # the last threshold batch and two oracle batches, nothing else
    lines = _problem_lines(tmp_path / "r")
    keys = [(r["key"], r["problem_id"]) for r in lines]
    assert len(keys) == len(set(keys)) == 18

    monkeypatch.setattr(runner, "generate", real)
    fresh = run_bench(_cfg(tiny_checkpoint, tmp_path / "fresh"), progress=False)
    strip = lambda res: [{k: v for k, v in row.items() if k not in ("tokens_per_s", "latency_s", "policy_time_frac")} for row in res["rows"]]
    assert strip(resumed) == strip(fresh)


def test_rerun_with_an_added_strategy_computes_only_that_one(tiny_checkpoint, tmp_path, monkeypatch):
    run_bench(_cfg(tiny_checkpoint, tmp_path, strategies=["low_confidence"]), progress=False)
    seen = []
    real = runner.generate
    monkeypatch.setattr(runner, "generate", lambda m, p, policy, **kw: seen.append(policy.name) or real(m, p, policy, **kw))
    results = run_bench(_cfg(tiny_checkpoint, tmp_path, strategies=["low_confidence", "one_shot"]), progress=False)
    assert set(seen) == {"one_shot"}
    assert [r["strategy"] for r in results["rows"]] == ["low_confidence", "one_shot"]
    assert results["rows"][1]["nfe"] == 1


def test_different_settings_in_the_same_folder_are_refused(tiny_checkpoint, tmp_path):
    run_bench(_cfg(tiny_checkpoint, tmp_path, strategies=["one_shot"]), progress=False)
    with pytest.raises(UnmaskError, match="different run.*seed"):
        run_bench(_cfg(tiny_checkpoint, tmp_path, strategies=["one_shot"], seed=3), progress=False)


def test_retrained_weights_under_the_same_name_are_not_resumed(tmp_path):
    # the built-in model keeps its name when it is retrained: its old answers must not be reused
    from unmask.testing import write_tiny_llada

    ckpt = tmp_path / "model"
    write_tiny_llada(ckpt, gen_length=16, block_length=8, seed=0)
    run_bench(_cfg(str(ckpt), tmp_path / "out", strategies=["one_shot"]), progress=False)
    write_tiny_llada(ckpt, gen_length=16, block_length=8, seed=1)
    with pytest.raises(UnmaskError, match="different run.*weights"):
        run_bench(_cfg(str(ckpt), tmp_path / "out", strategies=["one_shot"]), progress=False)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategies=["nope"]), "unknown strategy"),
        (dict(strategies=["threshold:tau=2"]), "tau"),
        (dict(limit=0), "limit"),
        (dict(batch_size=0), "batch-size"),
        (dict(task="nope"), "unknown task"),
        (dict(block_length=5), "does not divide"),
    ],
)
def test_bad_settings_fail_before_any_work(tiny_checkpoint, tmp_path, kw, match):
    with pytest.raises(UnmaskError, match=match):
        run_bench(_cfg(tiny_checkpoint, tmp_path, **kw), progress=False)
