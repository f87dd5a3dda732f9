"""The engine without HTTP: the batching decision, the answer rules, validation, events."""


import pytest

from unmask.decoding import generate
from unmask.errors import UnmaskError
from unmask.serve import AnswerTracker, Engine, EngineConfig, EngineStopped, GenerationRequest, QueueFull, take_batch
from unmask.serve.engine import BatchKey, Job
from unmask.testing import decode_until_final, serve_jobs, tiny_llada


def _job(key, cancelled=False):
    job = Job(prompt_ids=[1], key=key, strategy=key.strategy, params={}, tracker=None)
    if cancelled:
        job.cancel()
    return job


def test_take_batch_groups_compatible_jobs_in_order_up_to_the_limit():
    a = BatchKey("threshold", '{"tau": 0.9}', 16, 8, 0, "none")
    b = BatchKey("threshold", '{"tau": 0.8}', 16, 8, 0, "none")
    c = BatchKey("threshold", '{"tau": 0.9}', 16, 8, 1, "none")  # another seed: another batch
    from collections import deque

    jobs = [_job(a), _job(b), _job(a), _job(c), _job(a, cancelled=True), _job(a), _job(a)]
    queue = deque(jobs)
    first = take_batch(queue, 3)
    assert first == [jobs[0], jobs[2], jobs[5]]
    assert list(queue) == [jobs[1], jobs[3], jobs[6]]  # the cancelled job is gone, the rest keep order
    assert take_batch(queue, 3) == [jobs[1]]
    assert take_batch(queue, 3) == [jobs[3]]
    assert take_batch(queue, 3) == [jobs[6]]
    assert take_batch(queue, 3) == [] and not queue


def _tracker(max_tokens=None, stop=()):
    words = {i: w for i, w in enumerate(["<eos>", "the", "end", "is", "near", "x"])}
    return AnswerTracker(lambda ids: " ".join(words[i] for i in ids), stop_ids=[0], max_tokens=max_tokens, stop=stop)


def test_answer_tracker_stops_at_eos_and_streams_what_is_final():
    t = _tracker()
    assert t.update([1, 2]) == "the end"
    assert not t.done
    assert t.update([1, 2, 3, 0, 5]) == " is"
    assert t.done and t.finish_reason == "stop" and t.text == "the end is" and t.answer_ids == [1, 2, 3]
    assert t.finish([1, 2, 3, 0, 5, 5]) == ""


def test_answer_tracker_limits_the_answer_to_max_tokens():
    t = _tracker(max_tokens=3)
    assert t.update([1, 2]) == "the end"
    assert t.update([1, 2, 3, 4]) == " is"
    assert t.done and t.finish_reason == "length" and t.answer_ids == [1, 2, 3]
    t = _tracker(max_tokens=3)
    assert t.update([1, 2, 3, 0]) == "the end is" and t.finish_reason == "stop"  # EOS right at the limit


def test_answer_tracker_holds_back_a_possible_stop_string_and_cuts_at_it():
    t = _tracker(stop=["end is"])
    assert t.update([1, 2]) == "the "  # "end" may be the start of "end is"
    assert t.update([1, 2, 3, 4]) == ""  # the stop string arrived: nothing more
    assert t.done and t.text == "the " and t.finish_reason == "stop" and t.answer_ids == [1, 2]
    t = _tracker(stop=["end is"])
    assert t.update([1, 2]) == "the "
    assert t.update([1, 2, 4]) == "end near"  # it was not the stop string after all
    assert t.finish([1, 2, 4, 5]) == " x" and t.finish_reason == "length"


def _engine(**kw):
    return Engine(tiny_llada(gen_length=16, block_length=8), EngineConfig(**kw))


def test_prepare_names_the_field_of_each_problem():
    engine = _engine()
    cases = [
        (GenerationRequest("hi", strategy="nope"), "strategy"),
        (GenerationRequest("hi", strategy="threshold", strategy_params={"tau": 5}), "strategy_params.tau"),
        (GenerationRequest("hi", strategy_params={"bogus": 1}), "strategy_params.bogus"),
        (GenerationRequest("hi", gen_length=16, block_length=3), "block_length"),
        (GenerationRequest("hi", gen_length=10_000), "gen_length"),
        (GenerationRequest("hi " * 600), "prompt"),
        (GenerationRequest([], prompt_field="messages"), "messages"),
        (GenerationRequest("hi", max_tokens=10_000), "max_tokens"),
    ]
    for request, field in cases:
        with pytest.raises(UnmaskError) as err:
            engine.prepare(request)
        assert err.value.field == field, (request, err.value)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_engine_batches_queued_requests_and_matches_direct_decodes(batching):
    engine = _engine(max_batch_size=4, batching=batching)
    model = engine.model
    prompts = ["tom has 5 apples", "hello world", "what is 3 plus 4", "print x", "how many cats"]
    jobs = [engine.prepare(GenerationRequest(p, chat=False, strategy="threshold:tau=0.5")) for p in prompts]
    # queued before the worker starts: static batches 4 + 1; continuous starts 4 and the fifth joins
    # the running decode when a slot frees
    events = serve_jobs(engine, jobs, timeout=30)
    assert engine.stats["batches"] == (2 if batching == "static" else 1) and engine.stats["max_batch"] == 4
    assert engine.stats["batched_jobs"] == 5
    for i, prompt in enumerate(prompts):
        direct = generate(model, [prompt], "threshold:tau=0.5", chat=False).sequences[0]
        done = next(e for e in events if e.kind == "done" and e.index == i)
        streamed = "".join(e.text for e in events if e.kind == "delta" and e.index == i)
        assert done.text == direct.text == streamed
        assert done.usage["completion_tokens"] == direct.useful_tokens
        final = decode_until_final(model, prompt, "threshold:tau=0.5", chat=False)
        assert done.stats["strategy"] == "threshold" and done.stats["nfe"] == final.nfe


def test_submit_refuses_past_the_queue_limit():
    engine = _engine(max_queue=2)
    engine.start()
    try:
        jobs = [engine.prepare(GenerationRequest("hi")) for _ in range(3)]
        with pytest.raises(QueueFull):
            engine.submit(jobs, lambda e: None)  # all or nothing
        assert engine.stats["rejected"] == 3 and engine.waiting == 0
    finally:
        engine.stop()


def test_a_stopped_engine_refuses_new_jobs():
    engine = _engine()
    engine.start()
    engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit([engine.prepare(GenerationRequest("hi"))], lambda e: None)
