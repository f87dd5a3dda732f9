"""The Ray backend against the local one, on one local Ray with 2 CPUs shared by every test here."""

import json
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from unmask.bench import BenchConfig, run_bench  # noqa: E402
from unmask.bench.ray_backend import run_bench_ray  # noqa: E402
from unmask.errors import UnmaskError  # noqa: E402

STRATEGIES = ["low_confidence", "threshold:tau=0.5", "oracle"]
TIMING = ("tokens_per_s", "latency_s", "policy_time_frac")


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(tiny_checkpoint, out, **kw):
    base = dict(model=tiny_checkpoint, task="arith", limit=6, batch_size=3, out=str(out), strategies=STRATEGIES)
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def local_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_local")
    results = run_bench(_cfg(tiny_checkpoint, out), progress=False)
    return results, _problem_lines(out)


def _problem_lines(out):
    return [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()[1:]]


def _tokens(lines):
    return {(r["key"], r["problem_id"]): (r["text"], r["nfe"]) for r in lines}


def _strip(results):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in results["rows"]]


def _assert_equal_to_local(results, out, local_run):
    local_results, local_lines = local_run
    lines = _problem_lines(out)
    keys = [(r["key"], r["problem_id"]) for r in lines]
    assert len(keys) == len(set(keys)) == 18  # every (strategy, problem) once, none twice
    assert _tokens(lines) == _tokens(local_lines)
    assert _strip(results) == _strip(local_results)
    on_disk = json.loads((out / "results.json").read_text())
    assert _strip(on_disk) == _strip(local_results)
    return lines


def test_ray_rows_equal_the_local_rows(tiny_checkpoint, tmp_path, local_ray, local_run):
    results = run_bench(_cfg(tiny_checkpoint, tmp_path, backend="ray"), progress=False)
    lines = _assert_equal_to_local(results, tmp_path, local_run)
    assert results["backend"] == "ray" and results["device"].startswith("ray (2 actors)")
    assert results["ray"] == {"actors": 2, "lost_shards": 0, "replaced_actors": 0}
    print(f"\nequality: {len(lines)} problem rows, text and nfe identical to local; "
          + "; ".join(f"{r['strategy']} acc={r['accuracy']:.3f} nfe={r['nfe']:.3f}" for r in results["rows"]))


def _kill_after_first_shard(kill):
    """An on_event hook: once a shard is done, kill the next actor handed a shard, right after the hand-off."""
    events, state = [], {"killed": None}

    def on_event(kind, info):
        shard = info["shard"]
        events.append((kind, info["slot"], shard.index if shard else None, shard.attempts if shard else None))
        if kind == "submitted" and state["killed"] is None and any(e[0] == "done" for e in events):
            state["killed"] = (info["slot"], info["pid"], shard.index)
            kill(info)

    return on_event, events, state


@pytest.mark.parametrize("how", ["sigkill", "ray.kill"])
def test_a_worker_killed_mid_sweep_loses_nothing_and_counts_nothing_twice(
    tiny_checkpoint, tmp_path, local_ray, local_run, how
):
    kill = (lambda info: os.kill(info["pid"], signal.SIGKILL)) if how == "sigkill" else (lambda info: ray.kill(info["actor"]))
    on_event, events, state = _kill_after_first_shard(kill)
    results = run_bench_ray(_cfg(tiny_checkpoint, tmp_path, backend="ray"), progress=False, on_event=on_event)

    slot, pid, shard_index = state["killed"]
    assert ("lost", slot, shard_index, 1) in events
    reruns = [e for e in events if e[0] == "submitted" and e[2] == shard_index and e[3] == 2]
    assert len(reruns) == 1
    assert [e for e in events if e[0] == "done" and e[2] == shard_index] == [("done", reruns[0][1], shard_index, 2)]
    assert ("replaced", slot, None, None) in events
    assert results["ray"]["lost_shards"] == 1 and results["ray"]["replaced_actors"] == 1
    lines = _assert_equal_to_local(results, tmp_path, local_run)
    done = [e for e in events if e[0] == "done"]
    print(f"\nfault ({how}): killed slot {slot} (pid {pid}) holding shard {shard_index}; re-run on slot "
          f"{reruns[0][1]}; {len(done)} shards done, {len(lines)} unique rows, n per strategy "
          f"{[r['n'] for r in results['rows']]}")


def test_an_interrupted_ray_sweep_resumes_from_problems_jsonl(tiny_checkpoint, tmp_path, local_ray, local_run):
    done = []

    def interrupt_after_two(kind, info):
        if kind == "done":
            done.append(info["shard"].index)
            if len(done) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench_ray(_cfg(tiny_checkpoint, tmp_path, backend="ray"), progress=False, on_event=interrupt_after_two)
    assert len(_problem_lines(tmp_path)) == 6  # two shards of 3 saved, the one in flight dropped

    submitted = []
    results = run_bench_ray(
        _cfg(tiny_checkpoint, tmp_path, backend="ray"), progress=False,
        on_event=lambda kind, info: kind == "submitted" and submitted.append(info["shard"].problems),
    )
    assert len(submitted) == 4 and sum(len(p) for p in submitted) == 12  # only the 12 unsaved problems
    _assert_equal_to_local(results, tmp_path, local_run)


def test_a_bad_checkpoint_is_a_user_error_not_a_retry_loop(tmp_path, local_ray):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(UnmaskError):
        run_bench(_cfg(str(tmp_path / "ckpt"), tmp_path / "out", backend="ray", strategies=["one_shot"]), progress=False)


def test_cli_passes_backend_and_address(monkeypatch, tmp_path, capsys):
    import unmask.bench.compare
    from unmask.cli import main

    seen = {}

    def fake_run_bench(cfg, progress=True, on_row=None):
        seen.update(backend=cfg.backend, address=cfg.address)
        (tmp_path / "results.md").write_text("table\n")

    monkeypatch.setattr(unmask.bench.compare, "run_bench", fake_run_bench)
    assert main(["bench", "--model", "builtin", "--backend", "ray", "--address", "auto", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert seen == {"backend": "ray", "address": "auto"}
    monkeypatch.undo()

    assert main(["bench", "--address", "auto", "--out", str(tmp_path / "x"), "--strategy", "one_shot"]) == 2
    assert "--backend ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "slurm"])
    assert exc.value.code == 2
