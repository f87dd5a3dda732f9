"""Bad input gets a 4xx OpenAI error that names the field; fuzzed requests never get a 5xx."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.testing import TINY_WORDS, tiny_llada  # noqa: E402

OK_MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llada(gen_length=16, block_length=8)
    engine = build_engine(model, max_batch_size=4, max_queue=64)
    with serve_in_thread(engine, host="127.0.0.1") as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http, engine, model
    torch.set_num_threads(before)


def _post(http, path, body):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


CASES = [
    # (path, body, status, param, words that must appear in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"", 400, None, "empty"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", b'{"prompt": NaN}', 400, None, "NaN"),
    ("/v1/completions", {}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "must be"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "must be"),
    ("/v1/completions", {"prompt": [100000]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "strategy": "nope"}, 400, "strategy", "unknown strategy"),
    ("/v1/completions", {"prompt": "hi", "strategy": "threshold:tau"}, 400, "strategy", "key=value"),
    ("/v1/completions", {"prompt": "hi", "strategy": "threshold:bogus=1"}, 400, "strategy", "no parameter"),
    ("/v1/completions", {"prompt": "hi", "strategy": "threshold", "strategy_params": {"bogus": 1}}, 400,
     "strategy_params.bogus", "no parameter"),
    ("/v1/completions", {"prompt": "hi", "strategy": "threshold", "strategy_params": {"tau": 7}}, 400,
     "strategy_params.tau", "tau"),
    ("/v1/completions", {"prompt": "hi", "strategy": "threshold", "strategy_params": {"tau": "high"}}, 400,
     "strategy_params.tau", "must be float"),
    ("/v1/completions", {"prompt": "hi", "strategy_params": [1]}, 400, "strategy_params", "object"),
    ("/v1/completions", {"prompt": "hi", "strategy": 3}, 400, "strategy", "string"),
    ("/v1/completions", {"prompt": "hi", "gen_length": -4}, 400, "gen_length", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "gen_length": 0}, 400, "gen_length", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "gen_length": 10**12}, 400, "gen_length", "context"),
    ("/v1/completions", {"prompt": "hi", "gen_length": "16"}, 400, "gen_length", "integer"),
    ("/v1/completions", {"prompt": "hi", "gen_length": 16.5}, 400, "gen_length", "integer"),
    ("/v1/completions", {"prompt": "hi", "gen_length": True}, 400, "gen_length", "integer"),
    ("/v1/completions", {"prompt": "hi", "gen_length": 16, "block_length": 5}, 400, "block_length", "divide"),
    ("/v1/completions", {"prompt": "hi", "block_length": 1000}, 400, "block_length", "divide"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "at least 0"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop", "string"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "empty"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n", "not supported"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "between"),
    ("/v1/completions", {"prompt": "hi", "gen_lenght": 16}, 400, "gen_lenght", "unknown field"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "hi " * 600}, 400, "prompt", "context"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {}, 400, "messages", "required"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "array"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"messages": [1]}, 400, "messages[0]", "object"),
    ("/v1/chat/completions", {"messages": OK_MESSAGES, "block_length": 3}, 400, "block_length", "divide"),
    ("/v1/chat/completions", {"messages": OK_MESSAGES, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
]


@pytest.mark.parametrize("path,body,status,param,words", CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_4xx_error_naming_the_field(server, path, body, status, param, words):
    http, _, _ = server
    response = _post(http, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words.lower() in error["message"].lower(), error["message"]


def test_wrong_method_and_unknown_route_are_json_errors(server):
    http, _, _ = server
    for response in (http.get("/v1/completions"), http.post("/v2/nothing", json={})):
        assert 400 <= response.status_code < 500
        assert "message" in response.json()["error"]


# --- fuzzing ------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
strategies = st.sampled_from(["low_confidence", "threshold", "threshold:tau=0.5", "r2", "psd", "margin:steps=2",
                              "nope", "threshold:tau=2", "threshold:", ":", "", "one_shot", "entropy:steps=-3"])
lengths = st.sampled_from([None, -1, 0, 1, 2, 3, 4, 8, 16, 24, 10**6, "8", 8.0, 2.5, True])
field_values = {
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 200), max_size=6) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=20) | json_values}), max_size=3)
    | json_values,
    "strategy": strategies | json_values,
    "strategy_params": st.dictionaries(st.sampled_from(["tau", "steps", "k", "depth", "bogus", "temperature"]),
                                       json_scalars, max_size=3) | json_values,
    "gen_length": lengths, "block_length": lengths, "max_tokens": lengths,
    "seed": st.integers(-3, 2**64) | json_values,
    "stop": st.none() | st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | json_values,
    "stream": st.booleans() | json_values,
    "temperature": st.none() | st.floats(-1, 3) | json_values,
    "n": st.sampled_from([None, 1, 2]),
    "model": st.sampled_from([None, "tiny-llada", "other"]),
}
text = st.lists(st.sampled_from(TINY_WORDS), min_size=1, max_size=8).map(" ".join)
valid_fields = {
    "strategy": st.sampled_from(["low_confidence", "threshold:tau=0.5", "margin", "entropy:steps=4", "r2", "psd",
                                 "one_shot", "factor", "random"]),
    "gen_length": st.sampled_from([8, 16, 24]), "block_length": st.sampled_from([4, 8]),
    "max_tokens": st.integers(1, 20), "seed": st.integers(0, 100), "stop": st.sampled_from(TINY_WORDS),
    "stream": st.booleans(), "temperature": st.sampled_from([0, 0.5]),
}


@st.composite
def requests(draw):
    """Mostly a valid request with zero to two fields replaced by fuzz; sometimes garbage throughout."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": draw(text)}]}
    else:
        body = {"prompt": draw(text)}
    for name, values in valid_fields.items():
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(values)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(field_values)))
        body[name] = draw(field_values[name])
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return path, draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)), None
    if kind == 1:
        return path, body, draw(st.binary(max_size=40))
    return path, body, None


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=requests())
def test_fuzzed_requests_never_get_a_5xx(server, request):
    http, _, _ = server
    path, body, raw = request
    content = raw if raw is not None else json.dumps(body)
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"]


def test_the_worker_survives_bad_input(server):
    http, engine, _ = server
    for body in ({"prompt": "hi", "strategy": "nope"}, {"prompt": "hi", "gen_length": -1}):
        assert _post(http, "/v1/completions", body).status_code == 400
    assert engine.alive and http.get("/health").json()["status"] == "ok"
    ok = http.post("/v1/completions", json={"prompt": "hello world"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
