"""Continuous batching through a running server and the official `openai` client: concurrent
requests with distinct seeds and temperatures share one running decode (joining it as slots free), and each answer
equals a direct decode of the same request, with and without the KV cache."""

import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.models import load_model  # noqa: E402
from unmask.serve import build_engine, serve_in_thread  # noqa: E402

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "print x", "how many cats", "ann has 2 pens",
           "sam", "x = 3 . y = x + 1 . print y"]
STRATEGIES = ["random", "threshold:tau=0.5", "psd:tau=0.5", "r2:tau=0.5"]
TEMPERATURES = [0.0, 0.7, 0.0, 1.2]  # the OpenAI temperature of request i: mixed within one decode


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(tiny_checkpoint, device="cpu")
    torch.set_num_threads(before)


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_concurrent_requests_with_distinct_seeds_share_a_decode_and_match_direct_decodes(model, strategy, cache):
    engine = build_engine(model, strategy="low_confidence", max_batch_size=3, cache=cache)
    answers, errors = {}, []
    with serve_in_thread(engine, host="127.0.0.1") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(i):
            try:
                r = client.completions.create(model=model.name, prompt=PROMPTS[i], max_tokens=32,
                                              temperature=TEMPERATURES[i % len(TEMPERATURES)],
                                              extra_body={"strategy": strategy, "seed": 100 + i, "gen_length": 32,
                                                          "block_length": 8})
                answers[i] = (r.choices[0].text, r.model_extra["unmask"])
            except Exception as exc:  # reported below, with the request it belongs to
                errors.append((i, exc))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        health = engine.health()
    assert not errors, errors
    for i, prompt in enumerate(PROMPTS):
        t = TEMPERATURES[i % len(TEMPERATURES)]
        spec = strategy + ((("," if ":" in strategy else ":") + f"temperature={t}") if t else "")
        seq = generate(model, [prompt], spec, chat=False, seed=100 + i, gen_length=32, block_length=8,
                       cache=cache).sequences[0]
        text, stats = answers[i]
        assert text == seq.text, (i, strategy)
        # a sequence whose answer can no longer change leaves the decode early: never more calls
        assert 1 <= stats["nfe"] <= seq.nfe and stats["seed"] == 100 + i
    # eight requests with eight seeds and three temperatures, three slots: fewer decodes than requests, none over 3 at once
    assert health["batching"] == "continuous"
    assert health["batches"] < len(PROMPTS) and health["max_batch"] <= 3
    assert health["completed"] == len(PROMPTS)


def test_static_batching_splits_by_seed(model):
    engine = build_engine(model, max_batch_size=8, batching="static")
    jobs = [engine.prepare(_request(p, seed)) for p, seed in [("hi", 1), ("ho", 2), ("hu", 1)]]
    from unmask.serve.engine import take_batch
    from collections import deque

    queue = deque(jobs)
    assert take_batch(queue, 8) == [jobs[0], jobs[2]]  # the same seed only
    cont = build_engine(model, max_batch_size=8)
    jobs = [cont.prepare(_request(p, seed)) for p, seed in [("hi", 1), ("ho", 2), ("hu", 1)]]
    assert take_batch(deque(jobs), 8) == jobs  # continuous: any seed


def test_joiners_never_pass_a_waiting_request_of_another_kind(model):
    from collections import deque

    from unmask.serve.engine import take_joiners

    engine = build_engine(model, max_batch_size=8)
    running = engine.prepare(_request("hi", 1))
    a = engine.prepare(_request("ho", 2))                      # same kind, other seed: joins
    other = engine.prepare(_request("hu", 3, gen_length=8))    # another canvas length: another kind
    c = engine.prepare(_request("ha", 4))                      # same kind, but behind `other`
    queue = deque([a, other, c])
    assert take_joiners(queue, running, slots=8) == [a]
    assert list(queue) == [other, c]  # the decode drains; `other` starts the next one
    queue = deque([a, c])
    assert take_joiners(queue, running, slots=1) == [a] and list(queue) == [c]  # one free slot


def _request(prompt, seed, **kw):
    from unmask.serve.engine import GenerationRequest

    return GenerationRequest(prompt, chat=False, seed=seed, strategy="threshold", **kw)
