"""Concurrency: 64 clients get correct answers, a full queue answers 429, disconnects cancel decodes;
and the load benchmark (`benchmarks/serve_load.py`, `unmask.serve.load`): percentiles, the workload,
overload accounting, the --tiny run end to end on a real `unmask serve` process (the static engine,
and the continuous one with the dual KV cache)."""

import copy
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.serve.load import (LoadCase, Outcome, OverloadReport, ServerProcess, ServerStartError,  # noqa: E402
                               _account, compare, config_args, expected_texts, percentile, run_load, run_overload,
                               workload, workload_case)
from unmask.testing import tiny_llada  # noqa: E402

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "sam buys 2 pens and ann buys 6 pens",
           "print x", "how many cats", "the dogs gave the books to ann", "def f ( x ) : return x * 2"]


def load_cases() -> list[LoadCase]:
    """Three batch groups (strategy/seed/length), both endpoints, truncation and stop strings."""
    cases = []
    for i, prompt in enumerate(PROMPTS):
        cases.append(LoadCase("/v1/completions", {"prompt": prompt}))
        cases.append(LoadCase("/v1/completions", {"prompt": prompt, "strategy": "threshold:tau=0.5", "seed": 1,
                                                  "gen_length": 24, "max_tokens": 3 + i % 5}))
        cases.append(LoadCase("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                                       "strategy": "margin", "stop": "apples"}))
    return cases


def test_64_concurrent_clients_all_get_the_directly_decoded_answer(tmp_path):
    model = tiny_llada(gen_length=16, block_length=8)
    cases = load_cases()
    expected_texts(model, cases)
    engine = build_engine(model, max_batch_size=8, max_queue=256)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        report = run_load(url, cases, clients=64, requests_per_client=2, duration_s=60, timeout_s=60)
    out = tmp_path / "serve_load.json"
    out.write_text(json.dumps(report.to_dict(), indent=2))
    print(f"\nserve load: {report.summary()}\nserve load figures: {out}")
    assert report.requests == 128
    assert report.errors == 0 and report.mismatches == 0, report.examples
    assert report.engine["completed"] == 128
    assert report.engine["max_batch"] > 1  # concurrent requests were batched, not run one by one
    assert report.p95_s >= report.p50_s > 0


class SlowNetwork(torch.nn.Module):
    """The tiny network with a pause per call, so decodes last long enough to pile up or be left."""

    def __init__(self, inner, delay_s: float):
        super().__init__()
        self.inner, self.delay_s, self.vocab_size = inner, delay_s, inner.vocab_size

    def forward(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return self.inner(*args, **kwargs)


def slow_model(delay_s=0.02, gen_length=32, block_length=8):
    model = tiny_llada(gen_length=gen_length, block_length=block_length)
    return dataclasses.replace(model, network=SlowNetwork(model.network, delay_s), supports_cache=False)


def test_a_full_queue_answers_429_and_nothing_hangs():
    engine = build_engine(slow_model(), max_batch_size=1, max_queue=2)
    results: list = [None] * 10
    with serve_in_thread(engine, host="127.0.0.1") as url:
        def send(i):
            with httpx.Client(base_url=url, timeout=30) as http:
                try:
                    results[i] = http.post("/v1/completions", json={"prompt": "tom has 5 apples", "seed": i})
                except Exception as exc:  # a hang shows up as a timeout here
                    results[i] = exc
        threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        elapsed = time.perf_counter() - start
        later = httpx.post(url + "/v1/completions", json={"prompt": "hello"}, timeout=30)
    assert all(isinstance(r, httpx.Response) for r in results), results
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 3 and statuses.count(429) >= 4, statuses
    for r in results:
        if r.status_code == 429:
            error = r.json()["error"]
            assert "busy" in error["message"] and error["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
    assert elapsed < 30
    assert later.status_code == 200  # the server recovers once the queue drains
    assert engine.stats["rejected"] == statuses.count(429)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_cancels_its_decode():
    # 32 positions one per step at 20 ms a call: a full decode takes about 0.7 s
    engine = build_engine(slow_model(delay_s=0.02, gen_length=32, block_length=8), max_batch_size=4)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        # streaming: read the first block, then hang up
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "tom has 5 apples", "stream": True}) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
        assert _wait_for(lambda: engine.stats["cancelled"] == 1), engine.stats
        # non-streaming: the client times out long before the decode would end
        with httpx.Client(base_url=url, timeout=0.15) as http:
            with pytest.raises(httpx.TimeoutException):
                http.post("/v1/completions", json={"prompt": "hello world"})
        assert _wait_for(lambda: engine.stats["cancelled"] == 2), engine.stats
        assert _wait_for(lambda: engine.running == 0 and engine.waiting == 0)
        assert engine.stats["completed"] == 0
        ok = httpx.post(url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


# --- benchmarks/serve_load.py and its library --------------------------------------------------------

COLUMNS = ["config", "clients", "requests", "errors", "mismatches", "req/s", "completion tok/s", "p50 ms", "p95 ms",
           "p99 ms", "TTFB p50 ms", "TTFB p95 ms", "jobs/decode"]


def test_percentile_is_nearest_rank_by_hand():
    # rank = ceil(q/100 * n), the value at that rank in sorted order
    data = [50, 15, 40, 20, 35]  # sorted: 15 20 35 40 50
    assert [percentile(data, q) for q in (0, 5, 30, 40, 50, 100)] == [15, 15, 20, 20, 35, 50]
    one_to_twenty = list(range(20, 0, -1))
    assert percentile(one_to_twenty, 50) == 10  # ceil(10) = 10
    assert percentile(one_to_twenty, 95) == 19  # ceil(19) = 19
    assert percentile(one_to_twenty, 99) == 20  # ceil(19.8) = 20
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 51) == 3
    hundred = [i / 100 for i in range(1, 101)]
    assert (percentile(hundred, 50), percentile(hundred, 95), percentile(hundred, 99)) == (0.5, 0.95, 0.99)
    assert percentile([0.3], 99) == 0.3 and percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_the_workload_mixes_seeds_lengths_and_limits_the_same_way_for_any_client_count():
    shape = {"gen_lengths": [32, 48], "block_length": 16, "max_tokens": [None, 16]}
    cases = workload(128, 2, **shape)
    bodies = [case.body for client in cases for case in client]
    assert len({b["seed"] for b in bodies}) == 256  # every request its own seed
    assert {b["gen_length"] for b in bodies} == {32, 48} and {b.get("max_tokens") for b in bodies} == {None, 16}
    assert {b["block_length"] for b in bodies} == {16} and "strategy" not in bodies[0]
    assert {case.path for client in cases for case in client} == {"/v1/completions", "/v1/chat/completions"}
    assert workload(8, 2, **shape)[5][1] == cases[5][1] == workload_case(5, 1, **shape)
    assert len({case.body["seed"] for client in workload(8, 4, seed_pool=3, **shape) for case in client}) == 3


def test_configurations_pass_their_options_to_unmask_serve():
    assert config_args("static", has_batching=False) == []  # today's server is the static engine
    assert config_args("static", has_batching=True) == ["--batching", "static"]
    assert config_args("continuous", has_batching=False) == ["--batching", "continuous"]
    assert config_args("replicas2", has_batching=True) == ["--batching", "continuous", "--replicas", "2"]
    with pytest.raises(ValueError):
        config_args("dynamic", has_batching=True)


def test_a_server_that_cannot_start_is_reported_with_its_own_error(tmp_path):
    fake = ServerProcess(log_path=tmp_path / "fake.log", command=lambda port: [
        sys.executable, "-c", "import sys; print('starting'); sys.exit('unmask: error: unrecognized arguments: --x')"])
    with pytest.raises(ServerStartError, match="code 1.*unrecognized arguments: --x"):
        fake.start(timeout_s=30)
    assert fake.process is None


def _level(clients, p95, tps, errors=0):
    return {"clients": clients, "requests": 10, "errors": errors, "mismatches": 0, "p95_s": p95,
            "completion_tokens_per_s": tps}


def test_the_targets_compare_continuous_with_static_at_32_clients():
    static = {"name": "static", "levels": [_level(8, 1.0, 10.0), _level(32, 4.0, 100.0)]}
    good = {"name": "continuous", "levels": [_level(32, 1.6, 160.0)]}
    c = compare([static, good])
    assert (c["p95_ratio"], c["tokens_per_s_ratio"]) == (0.4, 1.6)
    assert (c["p95_verdict"], c["tokens_per_s_verdict"]) == ("PASS", "PASS")
    c = compare([static, {"name": "continuous", "levels": [_level(32, 2.4, 140.0)]}])
    assert (c["p95_verdict"], c["tokens_per_s_verdict"]) == ("MISS", "MISS")
    c = compare([static, {"name": "continuous", "levels": [_level(32, 1.0, 300.0, errors=1)]}])
    assert (c["p95_verdict"], c["tokens_per_s_verdict"]) == ("MISS", "MISS") and "continuous" in c["note"]
    c = compare([static, {"name": "continuous", "error": "unrecognized arguments: --batching"}])
    assert c["p95_verdict"] == "n/a" and "unrecognized" in c["note"]
    assert compare([static])["tokens_per_s_verdict"] == "n/a"


def test_overload_accounting_counts_every_answer_once():
    case = LoadCase("/v1/completions", {"prompt": "hello"}, expected="hi")

    def done(tag, rid, text="hi"):
        return Outcome(tag, "200", 0.1, 0.05, text, 2, (rid,), done_events=1, finishes=1)

    outcomes = [done("a", "cmpl-1"), done("b", "cmpl-2", text="wrong"), Outcome("c", "429", retry_after="1"),
                Outcome("d", "429"), Outcome("e", "Timeout"), done("f", "cmpl-1")]
    report = OverloadReport(clients=len(outcomes))
    _account(report, [(case, o) for o in outcomes])
    assert (report.requests, report.ok, report.mismatches, report.rejected, report.rejected_without_retry_after,
            report.hung, report.errors, report.duplicates) == (6, 2, 1, 1, 1, 1, 1, 1)
    assert not report.answered_once
    clean = OverloadReport(clients=3)
    _account(clean, [(case, done("a", "cmpl-1")), (case, Outcome("b", "429", retry_after="1")),
                     (case, done("c", "cmpl-3"))])
    assert clean.answered_once and (clean.ok, clean.rejected) == (2, 1)


def test_overload_on_a_server_with_max_queue_2_answers_every_request_once():
    shape = {"gen_lengths": [16], "block_length": 8, "max_tokens": [None, 4]}
    cases = [workload_case(c, 0, **shape) for c in range(10)]
    expected_texts(tiny_llada(gen_length=16, block_length=8), cases)  # the slow model's weights, undelayed
    engine = build_engine(slow_model(delay_s=0.02, gen_length=16, block_length=8), max_batch_size=1, max_queue=2)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        report = run_overload(url, cases, timeout_s=30, recovery_case=cases[0])
    assert report.requests == 10 and report.hung == 0 and report.duplicates == 0, report.examples
    assert report.errors == 0 and report.mismatches == 0, report.examples
    assert report.ok >= 3 and report.rejected >= 4 and report.ok + report.rejected == 10, report.statuses
    assert report.rejected_without_retry_after == 0
    assert report.server["rejected"] == report.rejected == engine.stats["rejected"]
    assert report.server["completed"] == report.ok
    assert report.server_agrees and report.answered_once and report.recovered


def _benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_benchmark_runs_end_to_end_on_a_static_server(tmp_path, capsys):
    code = _benchmark().main(["--tiny", "--configs", "static", "--clients", "1,8", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = (tmp_path / "serve_load.md").read_text()
    assert table in printed
    header = next(line for line in table.splitlines() if line.startswith("| config |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == COLUMNS
    rows = [line for line in table.splitlines() if line.startswith("| static |")]
    assert len(rows) == 2 and all(len(row.strip("|").split("|")) == len(COLUMNS) for row in rows)
    assert "continuous/static at 32 clients" in table and "n/a" in table
    result = json.loads((tmp_path / "serve_load.json").read_text())
    config = result["configs"][0]
    assert config["name"] == "static" and config["error"] is None and config["exit_code"] is not None
    assert [lv["clients"] for lv in config["levels"]] == [1, 8]
    for lv in config["levels"]:
        assert lv["requests"] >= 4 and lv["ok"] == lv["requests"], lv["examples"]
        assert lv["errors"] == lv["mismatches"] == lv["duplicates"] == lv["hung"] == 0
        assert lv["p99_s"] >= lv["p95_s"] >= lv["p50_s"] > 0 and lv["ttfb_p95_s"] >= lv["ttfb_p50_s"] > 0
        assert lv["requests_per_s"] > 0 and lv["completion_tokens_per_s"] > 0
    assert result["comparison"]["p95_verdict"] == "n/a"
    assert (tmp_path / "serve_load-static.log").exists()


def test_a_cached_server_is_checked_against_direct_decodes_with_the_same_cache():
    model = tiny_llada(gen_length=16, block_length=8)
    cases = [case for client in workload(6, 1, gen_lengths=[8, 16], block_length=8, max_tokens=[None, 4])
             for case in client]
    uncached = copy.deepcopy(cases)
    expected_texts(model, cases, default_strategy="threshold", cache="dual")
    expected_texts(model, uncached, default_strategy="threshold")
    # the cache is an approximation that changes answers of this model, so the check below can tell
    changed = sum(a.expected != b.expected for a, b in zip(cases, uncached))
    assert changed >= 1
    engine = build_engine(model, strategy="threshold", cache="dual")
    with serve_in_thread(engine, host="127.0.0.1") as url:
        report = run_load(url, cases, clients=6, requests_per_client=1, duration_s=60, timeout_s=60)
        wrong = run_load(url, uncached, clients=6, requests_per_client=1, duration_s=60, timeout_s=60)
    assert report.requests == 6 and report.errors == 0 and report.mismatches == 0, report.examples
    assert wrong.mismatches == changed


def test_the_benchmark_runs_a_continuous_server_with_the_dual_cache_end_to_end(tmp_path, capsys):
    code = _benchmark().main(["--tiny", "--configs", "continuous", "--clients", "1,8", "--cache", "dual",
                              "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "serve_load.json").read_text())
    config = result["configs"][0]
    args = config["server_args"]
    assert args[args.index("--cache") + 1] == "dual" and args[args.index("--batching") + 1] == "continuous"
    assert result["settings"]["cache"] == "dual" and "cache dual" in (tmp_path / "serve_load.md").read_text()
    for lv in config["levels"]:
        assert lv["requests"] >= 4 and lv["ok"] == lv["requests"], lv["examples"]
        assert lv["errors"] == lv["mismatches"] == lv["hung"] == 0
