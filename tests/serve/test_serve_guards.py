"""The worker never dies and a failure answers only the request it touches: a failure injected at each
stage (the decode, building one answer inside the loop, streaming one answer's blocks, sending one
final answer, the worker itself) gives that request a 500 naming the cause, and every other request
of the same decode is answered exactly as a direct decode; the next request is served. Also the
`/health` figure `mean_batch`: sequences per model call, worked by hand."""

from __future__ import annotations

import pytest

from unmask.decoding import generate
from unmask.serve import GenerationRequest, build_engine
from unmask.testing import scripted_model, serve_jobs, tiny_llada

PROMPTS = ["tom has 5 apples", "hello world", "what is 3 plus 4", "print x"]
BAD = 2  # the request whose answer the injected failure hits
SPEC = "threshold:tau=0.5"


@pytest.fixture(scope="module")
def model():
    return tiny_llada(gen_length=16, block_length=8)


def _serve(engine, prompts=PROMPTS, spec=SPEC):
    """Queue `prompts` before the worker starts, run them, and return every event by request."""
    jobs = [engine.prepare(GenerationRequest(p, chat=False, strategy=spec)) for p in prompts]
    events = serve_jobs(engine, jobs, timeout=60, stop=False)
    return {i: [e for e in events if e.index == i] for i in range(len(jobs))}


def _answered_exactly(model, events, prompts=PROMPTS, spec=SPEC, skip=(BAD,)):
    for i, prompt in enumerate(prompts):
        if i in skip:
            continue
        direct = generate(model, [prompt], spec, chat=False).sequences[0]
        done = [e for e in events[i] if e.kind == "done"]
        assert len(done) == 1 and done[0].text == direct.text, (i, events[i])
        assert "".join(e.text for e in events[i] if e.kind == "delta") == direct.text


def _one_500(events, words):
    errors = [e for e in events[BAD] if e.kind == "error"]
    assert len(errors) == 1 and not [e for e in events[BAD] if e.kind == "done"], events[BAD]
    assert errors[0].status == 500 and words in errors[0].message, errors[0].message


def _still_serves(engine, model):
    try:
        events = _serve(engine, ["ann has 3 cats"])
        _answered_exactly(model, events, ["ann has 3 cats"], skip=())
        assert engine.alive
    finally:
        engine.stop()


def _failing(method, marker):
    """`method` (a bound method of a job's tracker) raising for the job holding `marker`."""

    def wrapped(*args, **kwargs):
        raise RuntimeError(f"injected failure ({marker})")

    return wrapped


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_failure_while_building_one_answer_in_the_loop(monkeypatch, model, batching):
    import unmask.decoding.loop as loop

    real = loop.sequence_result

    def failing(m, **kwargs):
        if kwargs["prompt_ids"] == model.tokenizer.prompt_ids(PROMPTS[BAD], chat=False):
            raise RuntimeError("injected failure (result)")
        return real(m, **kwargs)

    monkeypatch.setattr(loop, "sequence_result", failing)
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4, batching=batching)
    events = _serve(engine)
    _one_500(events, "RuntimeError: injected failure (result)")
    _answered_exactly(model, events)
    monkeypatch.setattr(loop, "sequence_result", real)
    _still_serves(engine, model)


@pytest.mark.parametrize("stage", ["update", "finish"])
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_failure_while_streaming_or_sending_one_answer(model, batching, stage):
    # "update": the text of one streamed block; "finish": the final text of the answer
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4, batching=batching)
    prepare = engine.prepare

    def prepared(request):
        job = prepare(request)
        if request.prompt == PROMPTS[BAD]:
            setattr(job.tracker, stage, _failing(getattr(job.tracker, stage), stage))
        return job

    engine.prepare = prepared
    events = _serve(engine)
    _one_500(events, f"RuntimeError: injected failure ({stage})")
    _answered_exactly(model, events)
    engine.prepare = prepare
    _still_serves(engine, model)


def test_a_failing_decode_fails_its_batch_and_the_worker_goes_on(model):
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4)
    network = model.network
    original = network.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure (network)")
        return original(*args, **kwargs)

    network.forward = forward
    try:
        events = _serve(engine, spec="low_confidence")  # one commit per call: all four still decode at call 3
    finally:
        del network.forward
    for i in range(len(PROMPTS)):  # the decode failed at its third call: every request of it
        errors = [e for e in events[i] if e.kind == "error"]
        assert len(errors) == 1 and errors[0].status == 500
        assert "RuntimeError: injected failure (network)" in errors[0].message
    _still_serves(engine, model)


def test_an_error_outside_every_guard_answers_its_requests_and_the_worker_goes_on(model):
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4)
    decode = engine._decode

    def broken(batch):
        engine._decode = decode  # once
        raise RuntimeError("injected failure (worker)")

    engine._decode = broken
    events = _serve(engine, PROMPTS[:2])
    for i in range(2):
        errors = [e for e in events[i] if e.kind == "error"]
        assert len(errors) == 1 and errors[0].status == 500 and "injected failure (worker)" in errors[0].message
    _still_serves(engine, model)


def test_mean_batch_is_sequences_per_model_call():
    # a scripted model that never predicts a stop token, one commit per call (low_confidence):
    # a static batch of a 16- and a 32-token request takes 32 calls, the first 16 with both
    # sequences and the last 16 with one: (16 * 2 + 16 * 1) / 32 = 1.5
    def rule(row, gen_start):
        import torch

        probs = torch.full((row.shape[0], 96), 1.0 / 96)
        probs[gen_start:, 30] = 0.5
        return probs

    model = scripted_model(rule, gen_length=32, block_length=8)
    engine = build_engine(model, strategy="low_confidence", max_batch_size=4, batching="static")
    jobs = [engine.prepare(GenerationRequest("tom", chat=False, gen_length=g)) for g in (16, 32)]
    events = serve_jobs(engine, jobs, timeout=30)
    assert [e.kind for e in events if e.kind in ("done", "error")] == ["done", "done"]
    health = engine.health()
    assert (health["steps"], health["step_rows"], health["mean_batch"]) == (32, 48, 1.5)
