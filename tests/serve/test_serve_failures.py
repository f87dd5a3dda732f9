"""Failure paths against a running server: a decode that fails (500), a request during shutdown
(503), a failure after a stream has started (a last SSE error event, then [DONE]) and a body over
the limit (413). Each answer is OpenAI's error object, and the server goes on serving.

The served model is the tiny LLaDA with two faults wired in by prompt word: "sam" gets NaN logits
once the first of its two blocks is decoded (`unmask.testing.faulty_model`), "ann" makes the
network raise. Any other prompt decodes exactly as the tiny model does.
"""

import dataclasses
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.serve import Event, GenerationRequest, build_engine, serve_in_thread  # noqa: E402
from unmask.testing import faulty_model, tiny_llada  # noqa: E402

NAN_PROMPT = "sam has 5 pens"  # block 1 decodes to text without a stop token, block 2 meets NaN
RAISE_PROMPT = "ann has 3 cats"
CLEAN_PROMPT = "hello world"
LIMIT = 4096
HINT = "try --dtype fp32 (bf16 and fp16 overflow sooner) or check the checkpoint's weights"
# low_confidence commits one position per call: block 1 is calls 1-8, call 9 is block 2's first
NAN_MESSAGE = ("the model returned NaN or infinite logits for this request at its model call 9 (block 2 of 2): "
               f"16 of 16 generation positions; the decode was stopped; {HINT}")


class Exploding(torch.nn.Module):
    """The network, raising RuntimeError on any call whose input holds token `trigger`."""

    def __init__(self, inner, trigger: int):
        super().__init__()
        self.inner, self.trigger, self.vocab_size = inner, trigger, inner.vocab_size

    def forward(self, input_ids, **kwargs):
        if bool((input_ids == self.trigger).any()):
            raise RuntimeError("exploding network:\n the prompt asked for it")
        return self.inner(input_ids, **kwargs)


def served_model():
    base = tiny_llada(gen_length=16, block_length=8)
    exploding = dataclasses.replace(base, network=Exploding(base.network, base.tokenizer.token_id("ann")))
    return base, faulty_model(exploding, trigger="sam", after_blocks=1)


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base, model = served_model()
    engine = build_engine(model, max_batch_size=4)
    with serve_in_thread(engine, host="127.0.0.1", max_body_bytes=LIMIT) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with httpx.Client(base_url=url, timeout=30) as http:
            yield client, http, engine, base
    torch.set_num_threads(before)


def _direct(base, prompt):
    return generate(base, [prompt], "low_confidence", chat=False).sequences[0].text


def _serves_correctly(server):
    client, http, engine, base = server
    assert engine.alive and http.get("/health").json()["status"] == "ok"
    resp = client.completions.create(model=base.name, prompt=CLEAN_PROMPT)
    assert resp.choices[0].text == _direct(base, CLEAN_PROMPT)


def _error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    return error


# --- 500: the decode fails ---------------------------------------------------------------------
def test_nan_logits_answer_500_naming_the_fault_and_the_engine_serves_on(server):
    client, http, engine, base = server
    failed = engine.stats["failed"]
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=base.name, prompt=NAN_PROMPT)
    assert info.value.status_code == 500
    assert info.value.body["message"] == NAN_MESSAGE and info.value.body["type"] == "server_error"
    error = _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": NAN_PROMPT}]}), 500)
    assert error["type"] == "server_error" and "NaN or infinite logits for this request" in error["message"]
    assert engine.stats["failed"] == failed + 2
    _serves_correctly(server)


def test_a_decode_that_raises_answers_500_with_its_message(server):
    client, http, engine, base = server
    error = _error(http.post("/v1/completions", json={"prompt": RAISE_PROMPT}), 500)
    assert error == {"message": "internal error during decoding: RuntimeError: exploding network: the prompt asked for it",
                     "type": "server_error", "param": None, "code": None}
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=base.name, prompt=RAISE_PROMPT)
    _serves_correctly(server)


def test_a_request_whose_second_prompt_fails_names_that_prompt(server):
    client, http, engine, base = server
    error = _error(http.post("/v1/completions", json={"prompt": [CLEAN_PROMPT, NAN_PROMPT]}), 500)
    assert error["message"] == NAN_MESSAGE.replace("for this request", "for prompt 1 of this request")
    _serves_correctly(server)


def test_a_batch_mate_of_a_failing_prompt_is_told_why_it_failed():
    base, model = served_model()
    engine = build_engine(model, max_batch_size=4)
    jobs = [engine.prepare(GenerationRequest(p, chat=False)) for p in (CLEAN_PROMPT, NAN_PROMPT)]
    events: dict[int, Event] = {}
    got = threading.Event()

    def sink_for(index):
        def sink(event):
            if event.kind == "error":
                events[index] = event
                if len(events) == 2:
                    got.set()
        return sink

    engine.submit([jobs[0]], sink_for(0))  # two requests queued before the worker starts: one batch
    engine.submit([jobs[1]], sink_for(1))
    engine.start()
    try:
        assert got.wait(30)
    finally:
        engine.stop()
    assert engine.stats["batches"] == 1 and engine.stats["failed"] == 2
    assert events[1].status == 500 and events[1].message == NAN_MESSAGE
    assert events[0].status == 500 and events[0].message == (
        "this request's decode was stopped because another prompt in its batch failed; retry it ("
        + NAN_MESSAGE.replace("for this request", "for that prompt") + ")")


# --- SSE: the failure comes after the stream has started ----------------------------------------
def _sse(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": NAN_PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": NAN_PROMPT}]}),
])
def test_a_failure_after_streaming_started_is_a_last_error_event_then_done(server, path, body):
    client, http, engine, base = server
    with http.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and error["message"] == NAN_MESSAGE
    chunks = events[:-2]
    key = "text" if path == "/v1/completions" else "delta"
    texts = [c["choices"][0][key] if key == "text" else c["choices"][0]["delta"].get("content", "")
             for c in chunks]
    assert "".join(texts).strip()  # block 1's text was streamed before the failure
    assert all(c["choices"][0].get("finish_reason") is None for c in chunks)  # no choice claimed to finish
    assert not any("usage" in c and c["usage"] for c in chunks)
    _serves_correctly(server)


def test_the_openai_client_sees_the_streamed_text_then_an_api_error(server):
    client, http, engine, base = server
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.completions.create(model=base.name, prompt=NAN_PROMPT, stream=True):
            received.append(chunk.choices[0].text)
    assert "".join(received).strip()
    assert "NaN or infinite logits" in str(info.value.message)


# --- 413: the body is over the limit ------------------------------------------------------------
def _padded(size: int) -> bytes:
    """A valid request body of exactly `size` bytes (JSON allows trailing whitespace)."""
    raw = json.dumps({"prompt": CLEAN_PROMPT, "max_tokens": 2}).encode()
    return raw + b" " * (size - len(raw))


def _chunks(body: bytes, size: int = 1000):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_body_over_the_limit_gets_413_on_its_length_or_on_the_bytes_read(server):
    client, http, engine, base = server
    headers = {"Content-Type": "application/json"}
    assert http.post("/v1/completions", content=_padded(LIMIT), headers=headers).status_code == 200
    error = _error(http.post("/v1/completions", content=_padded(LIMIT + 1), headers=headers), 413)
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"limit of {LIMIT} bytes" in error["message"] and "--max-body-bytes" in error["message"]
    # chunked: no Content-Length, the bytes read count
    request = http.build_request("POST", "/v1/completions", content=_chunks(_padded(LIMIT + 1)), headers=headers)
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    _error(http.send(request), 413)
    assert http.post("/v1/completions", content=_chunks(_padded(LIMIT)), headers=headers).status_code == 200
    # a body far over the limit is refused on its Content-Length, and the official client says so
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=base.name, prompt="hello " * 100_000)
    assert info.value.status_code == 413 and "limit of 4096 bytes" in info.value.body["message"]
    _serves_correctly(server)


def test_the_default_limit_is_one_mib():
    import argparse

    from unmask.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve"]).max_body_bytes == 2**20
    engine = build_engine(tiny_llada(gen_length=16, block_length=8))
    with serve_in_thread(engine, host="127.0.0.1") as url, httpx.Client(base_url=url, timeout=30) as http:
        headers = {"Content-Type": "application/json"}
        assert http.post("/v1/completions", content=_padded(2**20), headers=headers).status_code == 200
        assert "limit of 1048576 bytes" in _error(
            http.post("/v1/completions", content=_padded(2**20 + 1), headers=headers), 413)["message"]


def test_bad_max_body_bytes_fails_before_the_model_loads():
    import argparse

    from unmask.errors import UnmaskError
    from unmask.serve.cli import add_serve_parser, run_serve

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(UnmaskError, match="--max-body-bytes must be at least 1"):
        run_serve(parser.parse_args(["serve", "--max-body-bytes", "0", "--model", "/does/not/exist"]))


# --- 503: requests during shutdown --------------------------------------------------------------
class Gated(torch.nn.Module):
    """The network, each call waiting until `gate` is set: a decode that lasts as long as a test needs."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.vocab_size, self.gate = inner, inner.vocab_size, threading.Event()

    def forward(self, *args, **kwargs):
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner(*args, **kwargs)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_requests_during_shutdown_get_503_and_the_running_decode_finishes():
    base = tiny_llada(gen_length=16, block_length=8)
    network = Gated(base.network)
    engine = build_engine(dataclasses.replace(base, network=network), max_batch_size=1)
    results = {}
    with serve_in_thread(engine, host="127.0.0.1") as url:
        def send(name, prompt):
            results[name] = httpx.post(url + "/v1/completions", json={"prompt": prompt}, timeout=30)

        running = threading.Thread(target=send, args=("running", CLEAN_PROMPT))
        running.start()
        assert _wait_for(lambda: engine.running == 1)  # its decode waits at the gate
        queued = threading.Thread(target=send, args=("queued", "tom has 5 apples"))
        queued.start()
        assert _wait_for(lambda: engine.waiting == 1)
        stopper = threading.Thread(target=engine.stop)  # what the server's shutdown does first
        stopper.start()
        assert _wait_for(lambda: engine._stopping)
        late = httpx.post(url + "/v1/completions", json={"prompt": CLEAN_PROMPT}, timeout=30)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=base.name, prompt=CLEAN_PROMPT)
        network.gate.set()
        for thread in (running, queued, stopper):
            thread.join(30)
        health = httpx.get(url + "/health", timeout=30)
    assert info.value.status_code == 503
    for response in (late, results["queued"]):
        error = _error(response, 503)
        assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert results["running"].status_code == 200  # the batch in progress runs to completion
    assert results["running"].json()["choices"][0]["text"] == _direct(base, CLEAN_PROMPT)
    assert health.status_code == 503 and health.json()["status"] == "engine stopped"
