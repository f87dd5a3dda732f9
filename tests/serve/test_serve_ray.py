"""`unmask serve --replicas N` on Ray Serve.

The first tests need no Ray: they drive the ingress's `relay` and a `ModelReplica` in this process,
with a stand-in for the deployment handle that can "die" at a chosen message, so the 503 rules
(before the answer, mid-JSON, mid-stream) and the pass-through of the app's own answers run in the
default test run. The `slow` tests start a real `unmask serve --replicas 2` as a subprocess (Ray
plus Serve take about 25 s to come up on two cores) and talk to it with the official `openai`
client: answers equal a direct decode, both replicas serve, streaming works, bad requests get the
single-process server's answers, and killing a replica's process mid-load fails its requests with
503 while the other replica's complete, until Ray Serve has replaced it. Run them with
`pytest -m slow tests/serve/test_serve_ray.py`.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import unmask  # noqa: E402
from unmask.decoding import generate  # noqa: E402
from unmask.errors import UnmaskError  # noqa: E402
from unmask.models import load_model  # noqa: E402
from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.serve.cli import add_serve_parser, run_serve  # noqa: E402
from unmask.serve.ray_serve import ModelReplica, app_builder, asgi_messages, relay, replica_resources  # noqa: E402

PROMPT = "tom has 5 apples and sam has 3 apples . how many apples"
LONG_PROMPT = "the cat sat on the mat"  # the tiny model's answer fills a 128-token canvas: a long decode
LIMIT = 4096


def direct(model, prompt, strategy="low_confidence", chat=False, **kw):
    return generate(model, [prompt], strategy, chat=chat, **kw).sequences[0]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


# --- the relay, in this process --------------------------------------------------------------------
class Died(Exception):
    """Stands in for Ray's RayActorError."""


class FakeStream:
    """A DeploymentResponseGenerator over `asgi_messages` whose replica dies after `die_after` messages."""

    def __init__(self, messages, die_after=None):
        self.messages, self.die_after, self.sent, self.cancelled = messages, die_after, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.die_after is not None and self.sent >= self.die_after:
            await self.messages.aclose()  # the replica's process is gone, and its decode with it
            raise Died("The actor died unexpectedly before finishing this task.")
        self.sent += 1
        return await self.messages.__anext__()

    def cancel(self):
        self.cancelled = True
        asyncio.ensure_future(self.messages.aclose())


@pytest.fixture(scope="module")
def replica(tiny_checkpoint):
    replica = ModelReplica({"model": tiny_checkpoint, "device": "cpu", "max_batch_size": 4, "max_body_bytes": LIMIT})
    yield replica
    replica.engine.stop()


def _relayed(replica, die_after=None, streams=None):
    """The ingress as an ASGI app over `replica`, its handle replaced by FakeStream."""

    def call(request):
        stream = FakeStream(replica.handle_http(request), die_after)
        if streams is not None:
            streams.append(stream)
        return stream

    async def app(scope, receive, send):
        await relay(scope, receive, send, call, LIMIT, died=(Died,))

    return app


async def _chunked_body():  # no Content-Length: the limit is judged on the bytes read
    for part in (b'{"prompt": "', b"x" * (2 * LIMIT), b'"}'):
        yield part


def _request(app, method, path, **kw):
    if kw.pop("chunked", False):
        kw["content"] = _chunked_body()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_the_relay_gives_the_apps_answers_and_names_the_replica(replica, model):
    resp = _request(_relayed(replica), "POST", "/v1/completions", json={"prompt": PROMPT, "seed": 3})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["text"] == direct(model, PROMPT, seed=3).text
    assert resp.headers["x-unmask-pid"] == str(os.getpid()) and resp.headers["x-unmask-replica"]
    health = _request(_relayed(replica), "GET", "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


BAD = [
    ("POST", "/v1/completions", {"content": b"{not json"}),
    ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "strategy": "nope"}}),
    ("POST", "/v1/chat/completions", {"json": {"messages": []}}),
    ("POST", "/v1/completions", {"json": {"prompt": "x" * (2 * LIMIT)}}),  # 413 on Content-Length
    ("POST", "/v1/completions", {"chunked": True}),  # 413 on the bytes read
    ("GET", "/v1/nope", {}),
    ("GET", "/v1/completions", {}),
]


@pytest.mark.parametrize("method,path,kw", BAD,
                         ids=["json", "strategy", "messages", "413", "413-chunked", "404", "405"])
def test_bad_requests_get_the_apps_own_answers(replica, method, path, kw):
    relayed = _request(_relayed(replica), method, path, **dict(kw))
    plain = _request(replica.app, method, path, **dict(kw))
    assert 400 <= relayed.status_code < 500
    assert (relayed.status_code, relayed.json()) == (plain.status_code, plain.json())


def test_a_full_queue_answers_429_with_retry_after(tiny_checkpoint):
    full = ModelReplica({"model": tiny_checkpoint, "device": "cpu", "max_queue": 0})
    try:
        resp = _request(_relayed(full), "POST", "/v1/completions", json={"prompt": PROMPT})
    finally:
        full.engine.stop()
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "queue_full"


def _died(resp):
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "replica_died"
    assert re.search(r"replica .*died; retry", error["message"])
    return error


@pytest.mark.parametrize("die_after", [0, 1], ids=["before-the-answer", "after-the-status-line"])
def test_a_replica_that_dies_under_a_json_request_answers_503(replica, die_after):
    _died(_request(_relayed(replica, die_after), "POST", "/v1/completions", json={"prompt": PROMPT}))
    assert replica.engine.alive  # (the stand-in killed only the request)


def test_a_replica_that_dies_mid_stream_ends_the_stream_with_the_error(replica):
    resp = _request(_relayed(replica, die_after=2), "POST", "/v1/completions",
                    json={"prompt": LONG_PROMPT, "gen_length": 64, "stream": True})
    assert resp.status_code == 200  # the status line went out before the replica died
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_died"
    assert re.search(r"replica \S+ serving this request died; retry", error["message"])
    assert len(events) >= 3  # some text came before the failure


def test_a_replica_that_dies_before_a_stream_starts_answers_503(replica):
    _died(_request(_relayed(replica, die_after=0), "POST", "/v1/completions", json={"prompt": PROMPT, "stream": True}))


def test_a_client_that_leaves_mid_stream_cancels_the_replicas_decode(replica):
    streams = []
    app = _relayed(replica, streams=streams)
    before = replica.engine.stats["cancelled"]

    async def go():
        body = json.dumps({"prompt": LONG_PROMPT, "gen_length": 128, "stream": True}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "headers": [(b"content-length", str(len(body)).encode())], "client": ("127.0.0.1", 1)}
        received = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            received.append(message)
            if len(received) == 3:  # the status line and one chunk, then the connection is gone
                raise OSError("connection reset by peer")

        with pytest.raises(OSError):
            await app(scope, receive, send)
        deadline = time.monotonic() + 10
        while replica.engine.stats["cancelled"] == before and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    asyncio.run(go())
    assert streams[0].cancelled
    assert replica.engine.stats["cancelled"] == before + 1


def test_asgi_messages_turns_an_app_that_fails_before_answering_into_a_500():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def go():
        request = {"method": "GET", "path": "/health", "headers": [], "body": b""}
        return [m async for m in asgi_messages(broken, request, [(b"x-unmask-pid", b"1")])]

    start, body = asyncio.run(go())
    assert start["status"] == 500 and (b"x-unmask-pid", b"1") in start["headers"]
    assert json.loads(body["body"])["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                                 "param": None, "code": None}


class FakeRay:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_replicas_take_a_gpu_each_where_there_are_gpus_else_a_cpu_slot():
    assert replica_resources(FakeRay(CPU=16, GPU=4), 4, None) == ({"num_gpus": 1, "num_cpus": 0}, "cuda")
    assert replica_resources(FakeRay(CPU=16, GPU=4), 3, "cpu") == ({"num_cpus": 1}, "cpu")
    assert replica_resources(FakeRay(CPU=2), 2, None) == ({"num_cpus": 1}, None)
    with pytest.raises(UnmaskError, match="needs a CPU slot per replica but Ray counts 2 CPUs"):
        replica_resources(FakeRay(CPU=2), 3, None)
    with pytest.raises(UnmaskError, match="needs a GPU per replica but this machine has 4"):
        replica_resources(FakeRay(CPU=16, GPU=4), 5, None)
    with pytest.raises(UnmaskError, match="asks for a GPU but Ray finds none"):
        replica_resources(FakeRay(CPU=16), 2, "cuda:0")


def test_replicas_below_one_fail_before_anything_starts():
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--replicas", "0", "--model", "/does/not/exist"])
    with pytest.raises(UnmaskError, match=r"\-\-replicas must be at least 1"):
        run_serve(args)
    assert parser.parse_args(["serve"]).replicas is None  # default: today's single-process server


def test_the_serve_run_builder_checks_its_arguments(tiny_checkpoint):
    pytest.importorskip("ray.serve")
    from ray.serve import Application

    assert isinstance(app_builder({"model": tiny_checkpoint, "replicas": "2", "max_batch_size": "4"}), Application)
    with pytest.raises(UnmaskError, match="unknown argument.*modle"):
        app_builder({"modle": tiny_checkpoint})


# --- a real `unmask serve --replicas 2` ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("ray.serve")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ray_serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the subprocess (and the Ray workers it starts) run the unmask this test imported
    env["PYTHONPATH"] = os.pathsep.join([str(Path(unmask.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    command = [sys.executable, "-m", "unmask", "serve", "--replicas", "2", "--model", tiny_checkpoint,
               "--port", str(port), "--max-batch-size", "4", "--strategy", "low_confidence", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "with 2 replicas" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"unmask serve --replicas 2 did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # serve.shutdown(); ray.shutdown()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(ray_server):
    return openai.OpenAI(base_url=ray_server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _pids(url, tries=40) -> set:
    """The pids of the replicas that answer /health (each answer names its replica's pid)."""
    seen = set()
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(tries):
            try:
                resp = http.get("/health")
            except httpx.HTTPError:
                continue
            if resp.status_code == 200 and resp.json()["status"] == "ok":
                seen.add(int(resp.headers["x-unmask-pid"]))
            if len(seen) == 2:
                break
    return seen


@pytest.mark.slow
def test_replicated_answers_equal_a_direct_decode(client, model):
    assert [m.id for m in client.models.list().data] == [model.name]
    resp = client.completions.create(model=model.name, prompt=PROMPT,
                                     extra_body={"strategy": "threshold:tau=0.5", "seed": 3, "gen_length": 32})
    seq = direct(model, PROMPT, "threshold:tau=0.5", seed=3, gen_length=32)
    assert resp.choices[0].text == seq.text
    assert resp.usage.completion_tokens == seq.useful_tokens
    messages = [{"role": "user", "content": "how many apples does tom have"}]
    chat = client.chat.completions.create(model=model.name, messages=messages, seed=1, extra_body={"gen_length": 16})
    assert chat.choices[0].message.content == direct(model, messages, chat=True, seed=1, gen_length=16).text
    several = client.completions.create(model=model.name, prompt=["hello world", PROMPT], extra_body={"seed": 5})
    assert [c.text for c in several.choices] == [direct(model, p, seed=5).text for p in ("hello world", PROMPT)]


@pytest.mark.slow
def test_both_replicas_serve(ray_server):
    assert len(_pids(ray_server[0])) == 2


@pytest.mark.slow
def test_replicated_streams_concatenate_to_the_direct_text(client, model):
    body = {"strategy": "threshold:tau=0.5", "seed": 7, "gen_length": 32, "block_length": 8}
    stream = client.completions.create(model=model.name, prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, extra_body=body)
    pieces, usage = [], None
    for event in stream:
        usage = event.usage or usage
        pieces.extend(c.text for c in event.choices if c.text)
    seq = direct(model, PROMPT, "threshold:tau=0.5", seed=7, gen_length=32, block_length=8)
    assert "".join(pieces) == seq.text and usage.completion_tokens == seq.useful_tokens
    assert len(pieces) >= 2  # a chunk per committed block, not one at the end
    messages = [{"role": "user", "content": "tom has 5 apples"}]
    chat = client.chat.completions.create(model=model.name, messages=messages, seed=2, stream=True,
                                          extra_body={"gen_length": 24})
    text = "".join(c.delta.content or "" for event in chat for c in event.choices)
    assert text == direct(model, messages, chat=True, seed=2, gen_length=24).text


@pytest.mark.slow
def test_replicated_bad_requests_get_the_single_process_answers(ray_server, client, model):
    requests = [
        ("POST", "/v1/completions", {"content": b"{not json"}),
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "strategy": "nope"}}),
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": model.max_length}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "robot", "content": "hi"}]}}),
        ("POST", "/v1/completions", {"json": {"prompt": "x" * (2**20 + 1)}}),  # over the default 1 MiB: 413
        ("GET", "/v1/nope", {}),
        ("DELETE", "/v1/models", {}),
    ]
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4)
    with serve_in_thread(engine, host="127.0.0.1") as single, httpx.Client(timeout=30) as http:
        for method, path, kw in requests:
            ours = http.request(method, ray_server[0] + path, **kw)
            theirs = http.request(method, single + path, **kw)
            assert 400 <= ours.status_code < 500, ours.text
            assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), path
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model.name, prompt=PROMPT, extra_body={"strategy": "nope"})
    assert err.value.body["param"] == "strategy"


def _holding_plain_requests(url, stream_pids) -> int:
    """A replica serving one of the streams and, by its engine's count, some of the plain requests too."""
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(200):
            resp = http.get("/health")
            pid, engine = int(resp.headers["x-unmask-pid"]), resp.json()["engine"]
            if pid in stream_pids and engine["running"] + engine["waiting"] > stream_pids.count(pid):
                return pid
    pytest.fail("no replica holds both a stream and a plain request")


@pytest.mark.slow
def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(ray_server, model):
    url = ray_server[0]
    body = {"prompt": LONG_PROMPT, "gen_length": 128, "block_length": 8}
    expected = direct(model, LONG_PROMPT, gen_length=128, block_length=8).text
    plain, streamed, stream_pids = [], [], {}

    def send_plain():
        resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
        plain.append(resp)

    def send_stream(i):
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
            stream_pids[i] = int(resp.headers["x-unmask-pid"])
            events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
        streamed.append((resp.status_code, stream_pids[i], events))

    threads = [threading.Thread(target=send_plain) for _ in range(6)]
    threads += [threading.Thread(target=send_stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(stream_pids) < 4 and time.monotonic() < deadline:  # every stream is on a replica
        time.sleep(0.01)
    assert len(stream_pids) == 4
    victim = _holding_plain_requests(url, list(stream_pids.values()))
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert len(plain) == 6 and len(streamed) == 4

    # in-flight requests on the dead replica: a 503 (JSON) or, for a stream under way, a last error event
    for status, pid, events in streamed:
        assert status == 200 and events[-1] == "[DONE]"
        if pid == victim:
            assert json.loads(events[-2])["error"]["code"] == "replica_died"
        else:
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
            assert text == expected
    died = [resp for resp in plain if resp.status_code == 503]
    assert died  # the victim held some of them
    for resp in died:
        _died(resp)
    for resp in plain:
        if resp.status_code == 200:  # the other replica's requests complete, correctly
            assert int(resp.headers["x-unmask-pid"]) != victim
            assert resp.json()["choices"][0]["text"] == expected
    assert len(died) + sum(resp.status_code == 200 for resp in plain) == 6

    # Ray Serve replaces the replica; then both serve again
    deadline = time.monotonic() + 180
    while True:
        pids = _pids(url, tries=10)
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced (replicas answering: {pids})"
        time.sleep(0.5)
    answers = [httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "seed": 4}, timeout=60) for _ in range(4)]
    assert all(a.status_code == 200 for a in answers)
    assert {a.json()["choices"][0]["text"] for a in answers} == {direct(model, PROMPT, seed=4).text}
