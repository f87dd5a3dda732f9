"""Concurrency: 64 clients get correct answers, a full queue answers 429, disconnects cancel decodes."""

import dataclasses
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.serve.load import LoadCase, expected_texts, run_load  # noqa: E402
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
