"""Continuous batching through a running server and the official `openai` client: concurrent
requests with distinct seeds, temperatures and gen_lengths share one running decode (joining it as
slots free), and each answer equals a direct decode of the same request, with and without the KV
cache."""

import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from unmask.decoding import generate  # noqa: E402
from unmask.models import load_model  # noqa: E402
from unmask.serve import build_engine, serve_in_thread  # noqa: E402
from unmask.testing import decode_until_final, serve_jobs  # noqa: E402

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "print x", "how many cats", "ann has 2 pens",
           "sam", "x = 3 . y = x + 1 . print y"]
STRATEGIES = ["random", "threshold:tau=0.5", "psd:tau=0.5", "r2:tau=0.5"]
TEMPERATURES = [0.0, 0.7, 0.0, 1.2]  # the OpenAI temperature of request i: mixed within one decode
GEN_LENGTHS = [32, 16, 24]  # the gen_length of request i: mixed within one decode too


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
                                              extra_body={"strategy": strategy, "seed": 100 + i,
                                                          "gen_length": GEN_LENGTHS[i % len(GEN_LENGTHS)],
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
        seq = generate(model, [prompt], spec, chat=False, seed=100 + i, gen_length=GEN_LENGTHS[i % len(GEN_LENGTHS)],
                       block_length=8, cache=cache).sequences[0]
        text, stats = answers[i]
        assert text == seq.text, (i, strategy)
        # a sequence whose answer can no longer change leaves the decode early: exactly the calls
        # of a direct decode that leaves by that rule
        final = decode_until_final(model, prompt, spec, chat=False, seed=100 + i,
                                   gen_length=GEN_LENGTHS[i % len(GEN_LENGTHS)], block_length=8, cache=cache)
        assert stats["nfe"] == final.nfe <= seq.nfe and stats["seed"] == 100 + i
        assert stats["gen_length"] == GEN_LENGTHS[i % len(GEN_LENGTHS)]
    # eight requests with eight seeds, three temperatures and three gen_lengths, three slots: fewer
    # decodes than requests, none over 3 at once
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
    other = engine.prepare(_request("hu", 3, block_length=4))  # another block length: another kind
    c = engine.prepare(_request("ha", 4))                      # same kind, but behind `other`
    queue = deque([a, other, c])
    assert take_joiners(queue, running, slots=8) == [a]
    assert list(queue) == [other, c]  # the decode drains; `other` starts the next one
    queue = deque([a, c])
    assert take_joiners(queue, running, slots=1) == [a] and list(queue) == [c]  # one free slot


def _request(prompt, seed, **kw):
    from unmask.serve.engine import GenerationRequest

    return GenerationRequest(prompt, chat=False, seed=seed, strategy="threshold", **kw)


def _run(engine, jobs) -> list:
    """Run `jobs` queued before the worker starts; every event, none of them an error."""
    events = serve_jobs(engine, jobs)
    assert not [e for e in events if e.kind == "error"], events
    return events


def _answer(events, i):
    return next(e for e in events if e.kind == "done" and e.index == i)


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("strategy", ["low_confidence", "threshold:tau=0.5", "r2:tau=0.5"])
def test_requests_of_different_gen_lengths_share_one_decode_and_match_direct_decodes(model, strategy, cache):
    # two slots, three requests queued before the worker starts: gen_lengths 16 and 48 start one
    # decode together (the canvas is 48), and the 32 joins it when the 16 leaves; one decode in all
    engine = build_engine(model, strategy="low_confidence", max_batch_size=2, cache=cache)
    cases = [("tom has 5 apples", 16, 0.0), ("what is 3 plus 4", 48, 0.0), ("hello world", 32, 0.9)]
    jobs = [engine.prepare(_request_with(prompt, 7 + i, strategy, g, block_length=8,
                                         strategy_params={"temperature": t} if t else None))
            for i, (prompt, g, t) in enumerate(cases)]
    events = _run(engine, jobs)
    assert engine.stats["batches"] == 1 and engine.stats["batched_jobs"] == 3 and engine.stats["max_batch"] == 2
    for i, (prompt, gen_length, t) in enumerate(cases):
        spec = strategy + ((("," if ":" in strategy else ":") + f"temperature={t}") if t else "")
        direct = generate(model, [prompt], spec, chat=False, seed=7 + i, gen_length=gen_length, block_length=8,
                          cache=cache).sequences[0]
        done = _answer(events, i)
        assert done.text == direct.text, (strategy, cache, i)
        final = decode_until_final(model, prompt, spec, chat=False, seed=7 + i, gen_length=gen_length, block_length=8,
                                   cache=cache)
        assert done.stats["gen_length"] == gen_length and done.stats["nfe"] == final.nfe <= direct.nfe


@pytest.mark.parametrize("strategy", ["oracle", "one_shot"])
def test_the_oracle_and_one_shot_decode_requests_of_different_lengths_in_one_batch(model, strategy):
    # the oracle prepares per batch (a static batch of mixed lengths); one_shot's block is each
    # request's whole generation, so its block length is not shared
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4)
    cases = [("tom has 5 apples", 8), ("what is 3 plus 4", 24), ("hello world", 16)]
    jobs = [engine.prepare(_request_with(prompt, 3, strategy, g, block_length=8)) for prompt, g in cases]
    events = _run(engine, jobs)
    assert engine.stats["batches"] == 1 and engine.stats["max_batch"] == 3
    for i, (prompt, gen_length) in enumerate(cases):
        direct = generate(model, [prompt], strategy, chat=False, seed=3, gen_length=gen_length, block_length=8)
        assert _answer(events, i).text == direct.sequences[0].text, (strategy, i)


def test_a_request_that_would_widen_the_canvas_past_the_context_waits_for_the_next_decode(model):
    from collections import deque

    from unmask.serve.engine import canvas_fits, take_batch, take_joiners

    engine = build_engine(model, max_batch_size=8)
    running = engine.prepare(_request("tom has 5 apples", 1, gen_length=16))
    wide = engine.prepare(_request("hi", 2, gen_length=64))
    later = engine.prepare(_request("ho", 3, gen_length=16))
    context = len(running.prompt_ids) + 63  # the running prompt with the wide generation: one too many
    assert not canvas_fits([running, wide], context) and canvas_fits([running, later], context)
    assert canvas_fits([running, wide], None)
    queue = deque([wide, later])
    assert take_joiners(queue, running, slots=8, context=context) == []  # first come, first served
    assert list(queue) == [wide, later]
    assert take_joiners(deque([wide, later]), running, slots=8) == [wide, later]  # no limit: both join
    queue = deque([running, wide, later])
    assert take_batch(queue, 8, context=context) == [running, later] and list(queue) == [wide]


def _request_with(prompt, seed, strategy, gen_length, **kw):
    from unmask.serve.engine import GenerationRequest

    return GenerationRequest(prompt, chat=False, seed=seed, strategy=strategy, gen_length=gen_length, **kw)
